"""Every bad input a careless user could give: exactly one `sparsefit: error:` line, the right exit
code, no traceback, and no file that existed before the command changed by it.

`{m}` is a tiny saved Llama, `{a}` a scratch folder with the files each case's setup wrote.
"""

import hashlib
import json
import shlex
from pathlib import Path

import pytest

from sparsefit.atomic import mark
from sparsefit.cli import main

SMALL = "--seq-len 64 --num-samples 4"
FT = "--max-steps 2 --batch-size 2 --seq-len 64 --format plain"

NON_UTF8 = b"caf\xe9 \xff\xfe\n"
BOMB = "\n".join(
    ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    + ["stages: [*a6]"]
)


def files(area: Path, spec: dict) -> None:
    for name, content in spec.items():
        path = area / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))


def earlier_output(area: Path, name: str = "out", user_file: bool = False) -> None:
    out = area / name
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier output")
    mark(out, "model.safetensors")
    if user_file:
        (out / "NOTES.md").write_text("the user's notes")


def unfinished_finetune(area: Path) -> None:
    out = area / "out"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "train_log.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    mark(out, "checkpoints", "train_log.jsonl")


def damaged_model(area: Path, model: Path, what: str) -> None:
    import shutil

    shutil.copytree(model, area / "bad")
    if what == "config":
        (area / "bad" / "config.json").write_text("{not json")
    elif what == "weights":
        weights = area / "bad" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif what == "tokenizer":
        for p in (area / "bad").glob("tokenizer*"):
            p.unlink()


def foreign_weights(area: Path, model: Path, how: str) -> None:
    """A checkpoint whose weights do not fit its config: one tensor short, or another architecture."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, area / "bad")
    if how == "missing-tensor":
        weights = load_file(str(area / "bad" / "model.safetensors"))
        del weights["model.layers.1.mlp.down_proj.weight"]
        save_file(weights, str(area / "bad" / "model.safetensors"), metadata={"format": "pt"})
    else:
        config = json.loads((area / "bad" / "config.json").read_text())
        config.update(model_type="bert", architectures=["BertLMHeadModel"], is_decoder=True)
        (area / "bad" / "config.json").write_text(json.dumps(config))


def finished_finetune(area: Path, model: Path) -> None:
    argv = ["finetune", "--model", str(model), *FT.split(), "--max-steps", "1", "--output", str(area / "out")]
    assert main(argv) == 0


def run_dir_with_bad_stage(area: Path) -> None:
    (area / "run" / "01-oneshot").mkdir(parents=True)
    mark(area / "run", "01-oneshot")
    (area / "run" / "01-oneshot" / "stage.json").write_text('{"name": "oneshot", "kin')


RECIPE = {"name": "r", "stages": [{"kind": "oneshot", "method": "magnitude", "calib": None}]}

# (id, argv, setup, exit code, message regex)
CASES = [
    # arguments
    ("no-command", "", None, 2, "required"),
    ("unknown-command", "nosuch", None, 2, "invalid choice"),
    ("int-flag-text", "eval --seq-len abc", None, 2, "invalid int value"),
    ("prune-no-output", "prune --model {m}", None, 2, "--output"),
    # the model
    ("model-missing-path", "eval --model ./missing", None, 2, "does not exist"),
    ("model-unknown-name", "eval --model not-a-builtin", None, 2, "unknown model"),
    ("model-not-gguf", "eval --model {a}/weights.bin", {"weights.bin": "x"}, 2, "not a .gguf"),
    ("model-empty-dir", "eval --model {a}/empty", {"empty/.keep": ""}, 2, "no config.json"),
    ("model-bad-config", "eval --model {a}/bad", "bad-config", 2, "could not load the model in .*damaged"),
    ("model-torn-weights", "eval --model {a}/bad", "bad-weights", 2, "could not load the model in .*damaged"),
    ("model-no-tokenizer", "eval --model {a}/bad", "bad-tokenizer", 2, "could not load the tokenizer"),
    ("model-missing-tensor", "eval --model {a}/bad", "missing-tensor", 2, "lacks weights.*layers.1.mlp.down_proj"),
    (
        "model-other-architecture",
        "prune --model {a}/bad --output {a}/o",
        "other-architecture",
        2,
        "lacks weights the Bert",
    ),
    ("dtype", "eval --model {m} --dtype half-ish", None, 2, "unknown dtype"),
    ("device", "eval --model {m} --device tpu", None, 2, "unknown device"),
    ("device-cuda", "eval --model {m} --device cuda", None, 2, "CUDA is not available"),
    # evaluation options
    ("seq-len-context", "eval --model {m} --seq-len 4096", None, 2, "larger than the model's context"),
    ("seq-len-1", "eval --model {m} --seq-len 1", None, 2, "at least 2"),
    ("eval-batch-0", "eval --model {m} --seq-len 64 --batch-size 0", None, 2, "--batch-size"),
    ("eval-windows-0", "eval --model {m} --seq-len 64 --max-windows 0", None, 2, "--max-windows"),
    ("eval-task", "eval --model {m} --task nope", None, 2, "unknown task"),
    ("gsm8k-max-new-0", "eval --model {m} --task gsm8k --max-new-tokens 0", None, 2, "--max-new-tokens"),
    ("gsm8k-fewshot-neg", "eval --model {m} --task gsm8k --num-fewshot -1", None, 2, "--num-fewshot"),
    ("gsm8k-fewshot-many", "eval --model {m} --task gsm8k --num-fewshot 1000", None, 2, "more than the 30"),
    ("gsm8k-limit-0", "eval --model {m} --task gsm8k --limit 0", None, 2, "--limit"),
    ("answer-ppl-batch-0", "eval --model {m} --task gsm8k-answer-ppl --batch-size 0", None, 2, "--batch-size"),
    ("gsm8k-rows-lack-fields", "eval --model {m} --task gsm8k-answer-ppl", "gsm8k-no-question", 2, "lacks a 'q"),
    ("gsm8k-empty", "eval --model {m} --task gsm8k", "gsm8k-empty", 2, "holds no rows"),
    # data files
    ("data-missing", "eval --model {m} --seq-len 64 --dataset missing.txt", None, 2, "not found"),
    (
        "data-suffix",
        "eval --model {m} --seq-len 64 --dataset {a}/d.csv",
        {"d.csv": "a,b"},
        2,
        "must end in .txt or .jsonl",
    ),
    ("data-not-utf8", "eval --model {m} --seq-len 64 --dataset {a}/d.txt", {"d.txt": NON_UTF8}, 2, "not UTF-8"),
    ("data-empty", "eval --model {m} --seq-len 64 --dataset {a}/d.txt", {"d.txt": "  \n"}, 2, "is empty"),
    (
        "jsonl-rows-lists",
        "eval --model {m} --seq-len 64 --dataset {a}/d.jsonl",
        {"d.jsonl": "[1, 2]\n"},
        2,
        "not an object",
    ),
    (
        "jsonl-number-rows",
        "eval --model {m} --seq-len 64 --dataset {a}/d.jsonl",
        {"d.jsonl": "3\n"},
        2,
        "not an object",
    ),
    (
        "jsonl-bad-line",
        "eval --model {m} --seq-len 64 --dataset {a}/d.jsonl",
        {"d.jsonl": '{"text": 1\n'},
        2,
        "not valid JSON",
    ),
    (
        "jsonl-field",
        "eval --model {m} --seq-len 64 --dataset {a}/d.jsonl --text-field body",
        {"d.jsonl": '{"text": "hi"}\n'},
        2,
        "no field 'body'",
    ),
    # result files
    ("json-is-dir", "eval --model {m} --seq-len 64 --json {a}", None, 2, "is a directory"),
    ("json-in-model", "eval --model {m} --seq-len 64 --json {m}/config.json", None, 2, "inside the input model"),
    ("json-under-file", "eval --model {m} --json {a}/f/r.json", {"f": "x"}, 2, "cannot write into"),
    ("baseline-missing", "eval --model {m} --baseline {a}/none.json", None, 2, "not found"),
    ("baseline-list", "eval --model {m} --baseline {a}/b.json", {"b.json": [1, 2]}, 2, "no evaluation result"),
    ("baseline-str", "eval --model {m} --baseline {a}/b.json", {"b.json": "ppl"}, 2, "not JSON|no evaluation"),
    ("baseline-nan", "eval --model {m} --baseline {a}/b.json", {"b.json": '{"ppl": NaN}'}, 2, "ppl nan"),
    ("baseline-no-metric", "eval --model {m} --baseline {a}/b.json", {"b.json": {"foo": 1}}, 2, "no evaluation"),
    # pruning options
    ("sparsity-range", "prune --model {m} --sparsity 1.5 --output {a}/o", None, 2, "sparsity"),
    ("sparsity-nan", "prune --model {m} --sparsity nan --output {a}/o", None, 2, "finite number"),
    ("damp-inf", "prune --model {m} --damp inf --output {a}/o", None, 2, "finite number"),
    ("owl-lambda-nan", "prune --model {m} --owl-lambda nan --output {a}/o", None, 2, "finite number"),
    (
        "hessian-not-pd",
        f"prune --model {{m}} {SMALL} --damp 1e-30 --output {{a}}/o",
        None,
        1,
        r"layers\.0\.self_attn\.q_proj.*not positive definite.*--damp",
    ),
    ("structure-text", "prune --model {m} --structure 2:x --output {a}/o", None, 2, "malformed"),
    ("structure-order", "prune --model {m} --structure 4:2 --output {a}/o", None, 2, "N must be smaller"),
    ("method", "prune --model {m} --method foo --output {a}/o", None, 2, "method"),
    ("profile-not-file", "prune --model {m} --profile nope --output {a}/o", None, 2, "neither uniform"),
    (
        "profile-bad-regex",
        "prune --model {m} --profile {a}/p.yaml --output {a}/o",
        {"p.yaml": "'mlp[': 0.5"},
        2,
        "bad regex",
    ),
    ("profile-list", "prune --model {m} --profile {a}/p.yaml --output {a}/o", {"p.yaml": "[0.5]"}, 2, "must map"),
    (
        "profile-text-value",
        "prune --model {m} --profile {a}/p.yaml --output {a}/o",
        {"p.yaml": "mlp: lots"},
        2,
        "profile",
    ),
    (
        "profile-no-match",
        f"prune --model {{m}} {SMALL} --profile {{a}}/p.yaml --output {{a}}/o",
        {"p.yaml": "'typo_proj': 0.6"},
        2,
        "matches no layer",
    ),
    ("profile-not-utf8", "prune --model {m} --profile {a}/p.yaml --output {a}/o", {"p.yaml": NON_UTF8}, 2, "not UTF-8"),
    ("nm-with-owl", "prune --model {m} --structure 2:4 --profile owl --output {a}/o", None, 2, "uniform"),
    ("wanda-no-calib", "prune --model {m} --method wanda --calib none --output {a}/o", None, 2, "calibration"),
    ("calib-missing", "prune --model {m} --calib missing.txt --output {a}/o", None, 2, "not found"),
    ("targets-bad-regex", "prune --model {m} --targets [ --output {a}/o", None, 2, "bad regex"),
    ("seed-negative", "prune --model {m} --seed -1 --output {a}/o", None, 2, "seed"),
    ("seed-huge", "prune --model {m} --seed 1180591620717411303424 --output {a}/o", None, 2, "seed"),
    ("num-samples-0", "prune --model {m} --num-samples 0 --output {a}/o", None, 2, "--num-samples"),
    (
        "offload-dir-file",
        f"prune --model {{m}} {SMALL} --offload-dir {{a}}/f --output {{a}}/o",
        {"f": "x"},
        2,
        "offload",
    ),
    # outputs
    ("output-file", "prune --model {m} --output {a}/f", {"f": "x"}, 2, "existing file"),
    ("output-cwd", "prune --model {m} --output .", None, 2, "current directory"),
    ("output-root", "prune --model {m} --output /", None, 2, "filesystem root"),
    (
        "output-user-dir",
        "prune --model {m} --output {a}/mine --overwrite",
        {"mine/thesis.tex": "x"},
        2,
        "did not write",
    ),
    ("output-earlier", "prune --model {m} --output {a}/out", "earlier", 2, "--overwrite"),
    (
        "output-earlier-user-file",
        "prune --model {m} --output {a}/out --overwrite",
        "earlier-user-file",
        2,
        r"NOTES\.md",
    ),
    (
        "output-holds-model",
        "prune --model {a}/models/m --output {a}/models --overwrite",
        "model-in-models",
        2,
        "contains the input model",
    ),
    ("output-is-model", "prune --model {m} --output {m} --overwrite", None, 2, "contains the input model"),
    ("json-in-output", "prune --model {m} --output {a}/o --json {a}/o/config.json", None, 2, "inside the output"),
    ("export-output-file", "export --model {m} --output {a}/f", {"f": "x"}, 2, "existing file"),
    ("export-format", "export --model {m} --format onnx --output {a}/o", None, 2, "unknown export format"),
    ("export-model-missing", "export --model ./gone --output {a}/o", None, 2, "does not exist"),
    # fine-tuning options
    ("lr-inf", f"finetune --model {{m}} {FT} --lr inf --output {{a}}/o", None, 2, "finite number"),
    ("lr-negative", f"finetune --model {{m}} {FT} --lr -1 --output {{a}}/o", None, 2, "lr"),
    ("temperature-nan", f"finetune --model {{m}} {FT} --temperature nan --output {{a}}/o", None, 2, "finite"),
    ("kl-without-teacher", f"finetune --model {{m}} {FT} --kl-weight 1 --output {{a}}/o", None, 2, "need a teacher"),
    (
        "teacher-zero-weights",
        f"finetune --model {{m}} {FT} --teacher {{m}} --kl-weight 0 --output {{a}}/o",
        None,
        2,
        "every distillation weight is 0",
    ),
    ("two-lengths", f"finetune --model {{m}} {FT} --num-epochs 1 --output {{a}}/o", None, 2, "only one of"),
    ("gmp-short", f"finetune --model {{m}} {FT} --gmp 0,0.5,10 --output {{a}}/o", None, 2, "--gmp takes"),
    ("gmp-nan", f"finetune --model {{m}} {FT} --gmp 0,nan,0,10,1 --output {{a}}/o", None, 2, "finite"),
    ("cycles-decreasing", f"finetune --model {{m}} {FT} --cycles 0.5,0.3 --output {{a}}/o", None, 2, "increasing"),
    ("cycles-inf", f"finetune --model {{m}} {FT} --cycles 0.3,inf --output {{a}}/o", None, 2, "finite"),
    ("cycles-range", f"finetune --model {{m}} {FT} --cycles 0.5,1.5 --output {{a}}/o", None, 2, r"in \(0, 1\)"),
    (
        "resume-finished-other-options",
        f"finetune --model {{m}} {FT} --max-steps 1 --lr 0.1 --resume --output {{a}}/out",
        "finished",
        2,
        r"finished with other options \(lr \(5e-05 -> 0.1\)\)",
    ),
    (
        "teacher-missing",
        f"finetune --model {{m}} {FT} --teacher ./no --kl-weight 1 --output {{a}}/o",
        None,
        2,
        "does not exist",
    ),
    ("ft-data-missing", f"finetune --model {{m}} {FT} --dataset missing.jsonl --output {{a}}/o", None, 2, "not found"),
    ("strategy", f"finetune --model {{m}} {FT} --strategy zero3 --output {{a}}/o", None, 2, "strategy"),
    ("resume-cycles", f"finetune --model {{m}} {FT} --resume --cycles 0.3 --output {{a}}/o", None, 2, "--resume"),
    (
        "resume-a-pruned-model",
        f"finetune --model {{m}} {FT} --resume --output {{a}}/out",
        "earlier",
        2,
        "not a fine-tune",
    ),
    ("unfinished-without-resume", f"finetune --model {{m}} {FT} --output {{a}}/out", "unfinished", 2, "--overwrite"),
    (
        "batch-too-large",
        f"finetune --model {{m}} {FT} --batch-size 100 --output {{a}}/o",
        None,
        2,
        "cannot fill one batch",
    ),
    ("ft-seq-len-1", f"finetune --model {{m}} {FT} --seq-len 1 --output {{a}}/o", None, 2, "--seq-len"),
    (
        "ft-rows-not-objects",
        f"finetune --model {{m}} {FT} --dataset {{a}}/d.jsonl --output {{a}}/o",
        {"d.jsonl": '"just text"\n'},
        2,
        "not an object",
    ),
    (
        "ft-json-in-output",
        f"finetune --model {{m}} {FT} --output {{a}}/o --json {{a}}/o/m.json",
        None,
        2,
        "inside the output",
    ),
    # recipes
    ("recipe-missing", "run {a}/none.yaml", None, 2, "neither a builtin"),
    ("recipe-yaml", "run {a}/r.yaml --check", {"r.yaml": "stages: [\n"}, 2, "does not parse"),
    ("recipe-not-utf8", "run {a}/r.yaml --check", {"r.yaml": NON_UTF8}, 2, "not UTF-8"),
    ("recipe-alias-bomb", "run {a}/r.yaml --check", {"r.yaml": BOMB}, 2, "aliases"),
    ("recipe-too-large", "run {a}/r.yaml --check", {"r.yaml": "# " + "x" * (1 << 20)}, 2, "the limit is"),
    ("recipe-name-escape", "run {a}/r.yaml --check", {"r.yaml": {**RECIPE, "name": "../../etc"}}, 2, "recipe name"),
    ("recipe-name-absolute", "run {a}/r.yaml --check", {"r.yaml": {**RECIPE, "name": "/tmp/x"}}, 2, "recipe name"),
    ("recipe-stages-int", "run {a}/r.yaml --check", {"r.yaml": "stages: 5"}, 2, "must be a list"),
    (
        "recipe-stage-text",
        "run {a}/r.yaml --set 1.max_steps=2 --check",
        {"r.yaml": "stages: [oneshot]"},
        2,
        "must be a mapping",
    ),
    (
        "recipe-variables-list",
        "run {a}/r.yaml --check",
        {"r.yaml": {**RECIPE, "variables": [1, 2]}},
        2,
        "'variables' must map",
    ),
    ("recipe-kind", "run {a}/r.yaml --check", {"r.yaml": {"stages": [{"kind": "distill"}]}}, 2, "unknown stage kind"),
    (
        "recipe-field",
        "run {a}/r.yaml --check",
        {"r.yaml": {"stages": [{"kind": "oneshot", "sparsty": 0.5}]}},
        2,
        "unknown field",
    ),
    ("recipe-inf", "run {a}/r.yaml --check", {"r.yaml": "stages: [{kind: finetune, lr: .inf}]"}, 2, "finite"),
    ("set-unknown-variable", "run quick --set nosuch=1 --check", None, 2, "no variable"),
    ("set-no-equals", "run quick --set sparsity --check", None, 2, "KEY=VALUE"),
    (
        "sparseml-args-list",
        "run {a}/r.yaml --check",
        {"r.yaml": {"pruning_stage": {"obcq_modifiers": {"SparseGPTModifier": [0.5]}}}},
        2,
        "must map argument",
    ),
    (
        "sparseml-targets-int",
        "run {a}/r.yaml --check",
        {"r.yaml": {"pruning_stage": {"obcq_modifiers": {"SparseGPTModifier": {"targets": 3}}}}},
        2,
        "list of names",
    ),
    (
        "run-into-user-dir",
        "run {a}/r.yaml --output {a}/mine",
        {"r.yaml": RECIPE, "mine/data.csv": "1"},
        2,
        "did not write",
    ),
    # reports
    ("report-missing", "report {a}/none", None, 2, "does not exist"),
    ("report-empty", "report {a}/run", {"run/x": "1"}, 2, "no finished stage"),
    ("report-damaged-stage", "report {a}/run", "bad-stage", 2, "is damaged"),
]

SETUPS = {
    "bad-config": lambda a, m: damaged_model(a, m, "config"),
    "bad-weights": lambda a, m: damaged_model(a, m, "weights"),
    "bad-tokenizer": lambda a, m: damaged_model(a, m, "tokenizer"),
    "earlier": lambda a, m: earlier_output(a),
    "earlier-user-file": lambda a, m: earlier_output(a, user_file=True),
    "unfinished": lambda a, m: unfinished_finetune(a),
    "bad-stage": lambda a, m: run_dir_with_bad_stage(a),
    "missing-tensor": lambda a, m: foreign_weights(a, m, "missing-tensor"),
    "other-architecture": lambda a, m: foreign_weights(a, m, "bert"),
    "finished": lambda a, m: finished_finetune(a, m),
    "model-in-models": lambda a, m: (mark(a / "models", "m"), __import__("shutil").copytree(m, a / "models" / "m")),
}


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "cache" not in p.parts
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from tests.conftest import tiny_model

    path = tmp_path_factory.mktemp("cli-errors") / "tiny"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("case, argv, setup, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line(case, argv, setup, code, message, model_dir, data_dir, tmp_path, capsys,
                                     monkeypatch):  # fmt: skip
    import re

    area = tmp_path / "area"
    area.mkdir()
    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(area)
    if isinstance(setup, dict):
        files(area, setup)
    elif setup == "gsm8k-no-question":
        (data_dir / "gsm8k" / "test.jsonl").write_text('{"q": "x", "answer": "1"}\n')
    elif setup == "gsm8k-empty":
        (data_dir / "gsm8k" / "test.jsonl").write_text("\n")
    elif setup is not None:
        SETUPS[setup](area, model_dir)
    before = {**snapshot(area), **{f"model/{k}": v for k, v in snapshot(model_dir).items()}}
    exit_code = main(shlex.split(argv.format(m=model_dir, a=area)))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sparsefit: error:")]
    assert exit_code == code, err[-2000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(message, errors[0]), errors[0]
    after = {**snapshot(area), **{f"model/{k}": v for k, v in snapshot(model_dir).items()}}
    assert {k: after.get(k) for k in before} == before  # no file that was there changed or went away


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES) and len({c[1] for c in CASES}) > 60


def test_an_unexpected_error_is_one_line_and_debug_shows_the_trace(monkeypatch, capsys):
    import sparsefit.cli.models as cli

    def broken(args):
        raise RuntimeError("something no one foresaw")

    monkeypatch.setattr(cli, "cmd_models", broken)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected RuntimeError at test_cli_errors.py:" in err and "--debug" in err
    assert main(["--debug", "models"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("sparsefit: error: unexpected RuntimeError")
