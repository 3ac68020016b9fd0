"""Bad inputs of the newer features (quantize, compact checkpoints, side files, AST options, recipe
bounds, SparseML field types), each run through the command line in-process: exactly one
`sparsefit: error:` line, never the last-resort "unexpected" one, and the right exit code (2 for
usage errors, 1 where sparsefit refuses to write damaged data)."""

import json
import shlex

import pytest
import torch

from sparsefit.cli import main

FT = "--batch-size 2 --seq-len 64 --format plain"
SMALL = "--seq-len 32 --num-samples 2"


def saved(path, tokenizer, change=None, fmt=None):
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    if change is not None:
        with torch.no_grad():
            change(model)
    if fmt is None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        from sparsefit.export import export_checkpoint

        export_checkpoint(model, tokenizer, path, "tiny", fmt)
    return path


def nan_weight(model):
    model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")


def huge_weight(model):
    model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1e6


def compact_int8_with_nan_scale(area, tokenizer):
    from safetensors.torch import load_file, save_file

    from sparsefit.export.compressed import save_quantized
    from sparsefit.quantization import QuantizeConfig, quantize
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    config = QuantizeConfig(method="rtn", scheme="w8a8-int8", sparse_format="sparse-bitmask")
    save_quantized(model, tokenizer, area / "q", quantize(model, None, config, progress=False))
    state = load_file(str(area / "q" / "model.safetensors"))
    state["model.layers.0.mlp.gate_proj.weight_scale"][0] = float("nan")
    save_file(state, str(area / "q" / "model.safetensors"), metadata={"format": "pt"})


def compact_claiming_a_huge_model(area, tokenizer):
    saved(area / "c", tokenizer, fmt="sparse-bitmask")
    config = json.loads((area / "c" / "config.json").read_text())
    config.update(hidden_size=1 << 16, intermediate_size=1 << 18, vocab_size=1 << 20, num_hidden_layers=200)
    (area / "c" / "config.json").write_text(json.dumps(config))


def with_side_file(area, tokenizer, name, tensors, metadata):
    from safetensors.torch import save_file

    saved(area / "s", tokenizer)
    if tensors is None:
        (area / "s" / name).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    else:
        save_file(tensors, str(area / "s" / name), metadata=metadata)


ROWS = "model.layers.0.mlp.down_proj.row_delta"
SPARSEML_INPUTS = {"q_stage": {"quantization_modifiers": {"GPTQModifier": {"config_groups": {
    "g": {"weights": {"num_bits": 8}, "input_activations": True, "targets": ["Linear"]}}}}}}  # fmt: skip
SPARSEML_COMPARISON = {"f_stage": {"distillation_modifiers": {"OutputDistillationModifier": {"comparison": ["kl"]}}}}
SPARSEML_SYMMETRIC = {"q_stage": {"quantization_modifiers": {"GPTQModifier": {"config_groups": {
    "g": {"weights": {"num_bits": 4, "symmetric": "no"}}}}}}}  # fmt: skip
HUGE_STAGE = {"stages": [{"kind": "finetune", "max_steps": 10**30, "seq_len": 10**14}]}

SETUPS = {
    "nan-model": lambda a, t: saved(a / "n", t, nan_weight),
    "huge-weight-model": lambda a, t: saved(a / "h", t, huge_weight),
    "compact-nan-scale": compact_int8_with_nan_scale,
    "compact-huge-config": compact_claiming_a_huge_model,
    "slorb-garbage": lambda a, t: with_side_file(a, t, "slorb.safetensors", None, None),
    "slorb-shape": lambda a, t: with_side_file(
        a, t, "slorb.safetensors", {"model.layers.0.mlp.up_proj.slorb.weight": torch.zeros(128, 3)},
        {"format": "sparsefit-slorb-1", "k": "16"},
    ),
    "rows-range": lambda a, t: with_side_file(
        a, t, "row_adapters.safetensors",
        {f"{ROWS}.rows": torch.tensor([3, 64]), f"{ROWS}.delta": torch.zeros(2, 128)}, {"format": "sparsefit-rows-1"},
    ),
    "rows-dtype": lambda a, t: with_side_file(
        a, t, "row_adapters.safetensors",
        {f"{ROWS}.rows": torch.tensor([3.0, 4.0]), f"{ROWS}.delta": torch.zeros(2, 128)},
        {"format": "sparsefit-rows-1"},
    ),
    "sparseml-inputs": lambda a, t: (a / "r.json").write_text(json.dumps(SPARSEML_INPUTS)),
    "sparseml-comparison": lambda a, t: (a / "r.json").write_text(json.dumps(SPARSEML_COMPARISON)),
    "sparseml-symmetric": lambda a, t: (a / "r.json").write_text(json.dumps(SPARSEML_SYMMETRIC)),
    "huge-stage": lambda a, t: (a / "r.json").write_text(json.dumps(HUGE_STAGE)),
}  # fmt: skip

# (id, argv, setup, exit code, message regex); {m}: a tiny saved Llama, {a}: the case's scratch folder
CASES = [
    # numbers out of range, named with the range at parse time
    ("ft-steps-huge", f"finetune --model {{m}} --output {{a}}/o {FT} --max-steps {10**30}", None, 2,
     r"--max-steps: must be from 1 to 1000000000 \(got 10{30}\)"),
    ("ft-seq-len-huge", f"finetune --model {{m}} --output {{a}}/o --batch-size 2 --max-steps 2 --seq-len {10**14}",
     None, 2, r"--seq-len: must be from 2 to 1048576"),
    ("ft-lora-rank-huge", f"finetune --model {{m}} --output {{a}}/o {FT} --max-steps 2 --peft lora --rank 1000000000",
     None, 2, r"--rank: must be from 1 to 1048576"),
    ("ft-zo-eps-huge", f"finetune --model {{m}} --output {{a}}/o {FT} --max-steps 2 --peft rows --criterion zo-taylor "
     "--zo-eps 1e30", None, 2, r"--zo-eps: must be above 0 and at most 1"),
    ("ft-lr-huge", f"finetune --model {{m}} --output {{a}}/o {FT} --max-steps 2 --lr 1e30", None, 2,
     r"--lr: must be above 0 and at most 10"),
    ("ft-temperature", f"finetune --model {{m}} --output {{a}}/o {FT} --max-steps 2 --temperature 1000", None, 2,
     r"--temperature: must be above 0 and at most 100"),
    ("prune-samples-huge", "prune --model {m} --output {a}/o --num-samples 100000000000 --seq-len 32", None, 2,
     r"--num-samples: must be from 1 to 1048576"),
    ("prune-damp-huge", f"prune --model {{m}} --output {{a}}/o --method sparsegpt --damp 1e30 {SMALL}", None, 2,
     r"--damp: must be above 0 and at most 10"),
    ("quantize-group-huge", "quantize --model {m} --output {a}/o --method rtn --group-size 1000000000000", None, 2,
     r"--group-size: must be from 1 to 1048576"),
    ("quantize-block-huge", f"quantize --model {{m}} --output {{a}}/o --block-size 100000000000 {SMALL}", None, 2,
     r"--block-size: must be from 1 to 1048576"),
    # N:M structures the AST path cannot use
    ("ast-structure-columns", f"finetune --model {{m}} --output {{a}}/o {FT} --max-steps 2 --method ast --structure "
     "1:3", None, 2, r"--structure 1:3 for method ast: .*divisible by 3"),
    # NaN / overflow never written
    ("quantize-nan-weights", "quantize --model {a}/n --output {a}/o --method rtn", "nan-model", 2,
     r"n/model.safetensors: tensor model.layers.1.mlp.up_proj.weight holds 1 NaN or infinite value; .*damaged"),
    ("quantize-fp16-overflow", "quantize --model {a}/h --output {a}/o --method rtn --export-dtype float16",
     "huge-weight-model", 2, r"q_proj: weights up to 1e\+06 need scales beyond float16 .*--export-dtype bfloat16"),
    ("export-nan-weights", "export --model {a}/n --output {a}/o", "nan-model", 2,
     r"n/model.safetensors: tensor model.layers.1.mlp.up_proj.weight holds 1 NaN or infinite value; .*damaged"),
    ("prune-nan-weights", "prune --model {a}/n --output {a}/o --method magnitude", "nan-model", 2,
     r"n/model.safetensors: tensor model.layers.1.mlp.up_proj.weight holds 1 NaN or infinite value; .*damaged"),
    # compact checkpoints and side files checked before allocating
    ("compact-nan-scale", "export --model {a}/q --output {a}/o", "compact-nan-scale", 2,
     r"q/model.safetensors: tensor model.layers.0.mlp.gate_proj.weight_scale holds 1 NaN or infinite value"),
    ("compact-huge-config", "export --model {a}/c --output {a}/o", "compact-huge-config", 2,
     r"model.safetensors: tensor model.embed_tokens.weight is \(256, 64\), but config.json implies \(1048576, 65536\)"),
    ("slorb-garbage", "export --model {a}/s --output {a}/o", "slorb-garbage", 2,
     r"cannot restore the SLoRB branches .*slorb.safetensors is not a readable safetensors file"),
    ("slorb-shape", "export --model {a}/s --output {a}/o", "slorb-shape", 2,
     r"slorb.safetensors: tensor model.layers.0.mlp.up_proj.slorb.weight is float32 \(128, 3\); expected float "
     r"\(128, 4\)"),
    ("rows-out-of-range", "export --model {a}/s --output {a}/o", "rows-range", 2,
     r"row_adapters.safetensors: tensor model.layers.0.mlp.down_proj.row_delta.rows holds rows outside 0..63"),
    ("rows-float-indices", "export --model {a}/s --output {a}/o", "rows-dtype", 2,
     r"row_delta.rows is float32 \(2,\); expected int64"),
    # recipes
    ("run-check-huge-stage", "run {a}/r.json --check", "huge-stage", 2,
     r"field 'seq_len': must be from 2 to 1048576 .*field 'max_steps': must be from 1 to 1000000000"),
    ("sparseml-inputs-type", "run {a}/r.json --check", "sparseml-inputs", 2,
     r"config_groups.input_activations must be a mapping, got True"),
    ("sparseml-comparison-type", "run {a}/r.json --check", "sparseml-comparison", 2,
     r"OutputDistillationModifier.comparison must be a name, got \['kl'\]"),
    ("sparseml-symmetric-type", "run {a}/r.json --check", "sparseml-symmetric", 2,
     r"weights.symmetric must be true/false, got 'no'"),
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return saved(tmp_path_factory.mktemp("round2") / "tiny", tokenizer)


@pytest.mark.parametrize("case, argv, setup, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line(case, argv, setup, code, message, model_dir, tokenizer, data_dir, tmp_path,
                                     capsys, monkeypatch):  # fmt: skip
    import re

    area = tmp_path / "area"
    area.mkdir()
    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path / "cache"))
    if setup is not None:
        SETUPS[setup](area, tokenizer)
    exit_code = main(shlex.split(argv.format(m=model_dir, a=area)))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sparsefit: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "unexpected" not in errors[0], errors[0]
    assert exit_code == code, err[-2000:]
    assert re.search(message, errors[0]), errors[0]
    assert not list((area / "o").rglob("*.safetensors")) if (area / "o").exists() else True  # no weights written


def test_the_table_is_distinct():
    assert len({c[0] for c in CASES}) == len(CASES) and set(SETUPS) >= {c[2] for c in CASES if c[2]}
