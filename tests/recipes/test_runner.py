"""`sparsefit run` on a tiny checkpoint: every stage kind, the report, plots, and resume."""

import json

import pytest
import yaml

from sparsefit.cli import main
from sparsefit.errors import UsageError
from sparsefit.recipes import recipe_from_data, run_recipe

EVAL = {
    "kind": "evaluate",
    "tasks": ["self-ppl", "perplexity", "gsm8k-answer-ppl"],
    "seq_len": 64,
    "max_windows": 2,
    "limit": 4,
    "self_samples": 2,
    "self_seq_len": 16,
}


def tiny_recipe(model, eval_dataset="wikitext2"):
    return {
        "name": "tiny",
        "model": str(model),
        "variables": {"sparsity": 0.5},
        "stages": [
            {**EVAL, "name": "dense", "baseline": True},
            {"kind": "oneshot", "method": "wanda", "sparsity": "${sparsity}", "num_samples": 4, "seq_len": 32},
            {**EVAL, "name": "pruned", "dataset": eval_dataset},
            {"kind": "finetune", "name": "recover", "dataset": "self", "self_samples": 8, "seq_len": 32,
             "teacher": "input", "ce_weight": 0.0, "kl_weight": 1.0, "square_head_weight": 1.0, "max_steps": 3,
             "batch_size": 2, "lr": 1e-3, "bf16": "false"},
            {**EVAL, "name": "recovered"},
            {"kind": "export"},
        ],
    }  # fmt: skip


def test_run_chain_report_and_resume(tiny_checkpoint, data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # a crash in stage 3 (its dataset is missing) ...
    broken = recipe_from_data(tiny_recipe(tiny_checkpoint, eval_dataset="missing.txt"))
    with pytest.raises(UsageError, match="missing.txt"):
        run_recipe(broken, run_dir, "cpu", progress=False)
    first = json.loads((run_dir / "02-oneshot" / "stage.json").read_text())
    # ... then the fixed recipe resumes: stages 1 and 2 are skipped, not redone
    report = run_recipe(recipe_from_data(tiny_recipe(tiny_checkpoint)), run_dir, "cpu", progress=False)
    out = capsys.readouterr().out
    assert "[1/6] dense: complete, skipped" in out and "[2/6] oneshot: complete, skipped" in out
    assert json.loads((run_dir / "02-oneshot" / "stage.json").read_text())["finished"] == first["finished"]
    rows = {r["stage"]: r for r in report["stages"]}
    assert list(rows) == ["dense", "oneshot", "pruned", "recover", "recovered", "export"]
    assert rows["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rows["recovered"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rows["recover"]["tokens_per_second"] > 0
    assert rows["dense"]["recovery"]["ppl"] == 1.0 and rows["dense"]["answer_ppl"] > 1.0
    for metric in ("self_ppl", "ppl", "answer_ppl"):
        expected = rows["pruned"][metric] / rows["dense"][metric]
        assert rows["pruned"]["recovery"][metric] == pytest.approx(expected) and expected != 1.0
    assert set(report["plots"]) == {"sparsity.png", "training.png", "metrics.png"}
    for name in report["plots"]:
        assert (run_dir / name).stat().st_size > 5000
    md = (run_dir / "report.md").read_text()
    assert "| recovered | evaluate | 0.500 |" in md and "![sparsity](sparsity.png)" in md
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["stages"][1]["sparsity"] == 0.5  # variables resolved
    assert (run_dir / "06-export" / "model.safetensors").is_file()
    # the export's model card: what made the model (the fine-tune's record) and the numbers the run measured on it
    card = (run_dir / "06-export" / "README.md").read_text()
    assert "**Fine-tuning**" in card and f"| {rows['recovered']['ppl']:.4g} |" in card
    assert f"| GSM8K answer perplexity | {rows['recovered']['answer_ppl']:.4g} |" in card

    # a full rerun skips every stage; the CLI prints the same table
    run_recipe(recipe_from_data(tiny_recipe(tiny_checkpoint)), run_dir, "cpu", progress=False)
    assert capsys.readouterr().out.count("complete, skipped") == 6
    assert main(["report", str(run_dir)]) == 0
    assert "recovered" in capsys.readouterr().out

    # changing a stage redoes it and everything after it, not what came before
    changed = tiny_recipe(tiny_checkpoint)
    changed["stages"][3]["max_steps"] = 2
    run_recipe(recipe_from_data(changed), run_dir, "cpu", progress=False)
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == 3 and "[4/6] recover (finetune)" in out


def test_missing_data_is_skipped_and_reported_when_asked(tiny_checkpoint, data_dir, tmp_path):
    stage = {**EVAL, "dataset": "missing.txt", "missing_data": "skip"}
    report = run_recipe(
        recipe_from_data({"model": str(tiny_checkpoint), "stages": [stage]}), tmp_path / "r", "cpu", False
    )
    (row,) = report["stages"]
    assert row["ppl"] is None and row["self_ppl"] > 1.0 and row["answer_ppl"] > 1.0
    assert any("perplexity skipped" in n and "missing.txt" in n for n in report["notes"])
    assert "perplexity skipped" in (tmp_path / "r" / "report.md").read_text()


def test_cli_run_check_and_errors(tmp_path, capsys):
    assert main(["run", "quick", "--check"]) == 0
    assert "oneshot" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - kind: oneshot\n    sparsity: 1.5\n")
    assert main(["run", str(bad), "--check"]) == 2
    err = capsys.readouterr().err
    assert "stage 1 (oneshot) field 'sparsity'" in err and err.count("\n") == 1
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert main(["recipes"]) == 0 and "2of4" in capsys.readouterr().out


def test_a_signalled_run_resumes_its_fine_tune_instead_of_restarting_it(tiny_checkpoint, data_dir, tmp_path, capsys):
    import signal

    import torch

    from sparsefit.errors import Interrupted
    from sparsefit.training.state import published_steps

    data = tiny_recipe(tiny_checkpoint)
    data["stages"] = data["stages"][:4]
    data["stages"][3].update(max_steps=6, checkpoint_every=2)
    calls = {"n": 0}

    def sigterm_in_step_3(module, args):  # counts the student's training forwards (one per step)
        if torch.is_grad_enabled() and getattr(module, "base_model", None) is module:  # the backbone's
            calls["n"] += 1
            if calls["n"] == 4:
                signal.raise_signal(signal.SIGTERM)

    from torch.nn.modules.module import register_module_forward_pre_hook

    hook = register_module_forward_pre_hook(sigterm_in_step_3)  # the stage loads its own model
    try:
        with pytest.raises(Interrupted):
            run_recipe(recipe_from_data(data), tmp_path / "run", "cpu", progress=False)
    finally:
        hook.remove()
    assert published_steps(tmp_path / "run" / "04-recover" / "checkpoints") == [4, 2]
    report = run_recipe(recipe_from_data(data), tmp_path / "run", "cpu", progress=False)
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "04-recover" / "metrics.json").read_text())["resumed_from"] == 4
    assert report["stages"][3]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_the_run_directory_and_the_recipe_name_are_guarded(tiny_checkpoint, data_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2")
    with pytest.raises(UsageError, match="did not write"):
        run_recipe(recipe_from_data(tiny_recipe(tiny_checkpoint)), mine, "cpu", progress=False)
    assert (mine / "data.csv").read_text() == "1,2"
    for name in ("../escape", "/abs", "a/b", ".hidden", ""):
        with pytest.raises(UsageError, match="recipe name"):
            recipe_from_data({**tiny_recipe(tiny_checkpoint), "name": name})


def test_quantize_stage_keeps_the_zeros_and_ends_the_chain(tiny_checkpoint, data_dir, tmp_path):
    """prune 2:4 -> quantize (its folder is the compressed-tensors export) -> evaluate it as loaded."""
    pytest.importorskip("compressed_tensors", reason="quantize stages need compressed-tensors (sparsefit[export])")
    recipe = recipe_from_data(
        {
            "name": "tiny-quant",
            "model": str(tiny_checkpoint),
            "stages": [
                {"kind": "oneshot", "method": "wanda", "structure": "2:4", "num_samples": 4, "seq_len": 32},
                {"kind": "quantize", "scheme": "w8a16", "group_size": 32, "num_samples": 4, "seq_len": 32},
                {**EVAL, "name": "quantized", "tasks": ["perplexity"]},
            ],
        }
    )
    report = run_recipe(recipe, tmp_path / "run", "cpu", progress=False)
    rows = {r["stage"]: r for r in report["stages"]}
    assert rows["quantized"]["sparsity"] == pytest.approx(0.5, abs=0.01) and rows["quantized"]["ppl"] > 1.0
    quant = json.loads((tmp_path / "run" / "02-quantize" / "stage.json").read_text())["result"]
    assert quant["revived_weights"] == 0 and quant["format"] == "pack-quantized"
    # A quantized model is the end of the chain: saving it again is refused, naming the way round.
    again = recipe_from_data({**recipe.model_dump(mode="json"), "name": "again",
                              "stages": [*recipe.model_dump(mode="json")["stages"], {"kind": "export"}]})  # fmt: skip
    with pytest.raises(UsageError, match="loaded from a quantized checkpoint"):
        run_recipe(again, tmp_path / "run2", "cpu", progress=False)


def test_stages_that_sample_the_same_model_alike_share_one_text(tiny_checkpoint, tmp_path):
    train = {"kind": "finetune", "dataset": "self", "self_samples": 4, "seq_len": 32, "max_steps": 1,
             "batch_size": 2, "bf16": "false"}  # fmt: skip
    recipe = {
        "name": "share",
        "model": str(tiny_checkpoint),
        "stages": [
            {"kind": "oneshot", "method": "wanda", "sparsity": 0.5, "calib": "self", "num_samples": 4, "seq_len": 32},
            {**train, "name": "recover", "teacher": "input"},  # the input model, as the calibration: shared
            {**train, "name": "again"},  # no teacher: text of recover's output, a model of its own
        ],
    }
    run_dir = tmp_path / "run"
    run_recipe(recipe_from_data(recipe), run_dir, "cpu", progress=False)
    assert len(list(run_dir.glob("self-text-*.safetensors"))) == 2
    # sampled text mixed into a dataset is sampled once by the runner too (another seed: another text)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "completion": " an answer"}) for i in range(4)))
    mix = {**train, "name": "mix", "dataset": str(data), "format": "plain", "self_mix": 4}
    recipe["stages"].append({**mix, "teacher": "input", "seed": 7})
    run_recipe(recipe_from_data(recipe), run_dir, "cpu", progress=False)
    assert len(list(run_dir.glob("self-text-*.safetensors"))) == 3
