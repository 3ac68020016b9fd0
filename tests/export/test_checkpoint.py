"""Plain HF checkpoints: measured sparsity, metadata, safetensors only, exact reload, the marker."""

import json

import pytest
import torch

from sparsefit.atomic import MARKER, foreign_entries, read_marker
from sparsefit.errors import UsageError
from sparsefit.export import export_checkpoint, read_sparsity, save_checkpoint, sparsity_summary
from sparsefit.models import load_model
from sparsefit.pruning import OneShotConfig, oneshot
from tests.conftest import tiny_model


def pruned(arch="llama", sparsity=0.5):
    model = tiny_model(arch)
    oneshot(model, None, OneShotConfig(method="magnitude", sparsity=sparsity, calib=None), progress=False)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsity_is_measured_on_the_weights(arch):
    model = pruned(arch, 0.6)
    summary = sparsity_summary(model)
    blocks = model.config.num_hidden_layers
    linears_per_block = 7 if arch == "llama" else 4
    assert len(summary["per_layer"]) == blocks * linears_per_block
    assert all(s == pytest.approx(0.6, abs=0.01) for s in summary["per_layer"].values())
    assert summary["overall"] == pytest.approx(0.6, abs=0.005)
    with torch.no_grad():  # one more zero moves the measure
        name = next(iter(summary["per_layer"]))
        weight = model.get_submodule(name).weight
        weight[tuple((weight != 0).nonzero()[0])] = 0.0
    assert sparsity_summary(model)["per_layer"][name] > summary["per_layer"][name]


def test_save_writes_safetensors_metadata_and_reloads_exactly(tmp_path, tokenizer):
    model = pruned()
    out = save_checkpoint(model, tokenizer, tmp_path / "out", {"pruning": {"method": "magnitude"}})
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    info = read_sparsity(out)
    assert info["pruning"] == {"method": "magnitude"} and info["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    assert set(read_marker(out)["entries"]) == set(names) - {MARKER} and foreign_entries(out) == []
    reloaded = load_model(str(out))
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_a_given_state_dict_replaces_the_models_tensors(tmp_path, tokenizer):
    """As an FSDP run saves: the gathered full tensors, not the module's own."""
    model = tiny_model("llama")
    state = {k: torch.zeros_like(v) if k.endswith("up_proj.weight") else v for k, v in model.state_dict().items()}
    out = save_checkpoint(model, tokenizer, tmp_path / "out", state_dict=state)
    reloaded = load_model(str(out))
    assert all((layer.mlp.up_proj.weight == 0).all() for layer in reloaded.model.layers)
    assert read_sparsity(out)["sparsity"]["per_layer"]["model.layers.0.mlp.up_proj"] == 1.0


def test_export_reports_files_bytes_and_sparsity(tmp_path, tokenizer):
    model = pruned()
    info = export_checkpoint(model, tokenizer, tmp_path / "hf", "pruned-model")
    assert info["format"] == "hf" and "model.safetensors" in info["files"] and MARKER not in info["files"]
    assert info["bytes"] == sum(p.stat().st_size for p in (tmp_path / "hf").iterdir() if p.is_file())
    assert info["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert read_sparsity(tmp_path / "hf")["exported_from"] == "pruned-model"
    with pytest.raises(UsageError, match="unknown export format 'onnx'"):
        export_checkpoint(model, tokenizer, tmp_path / "x", "pruned-model", "onnx")


def test_a_damaged_sparsity_file_reads_as_absent(tmp_path):
    (tmp_path / "sparsity.json").write_text("{not json")
    assert read_sparsity(tmp_path) is None
    (tmp_path / "sparsity.json").write_text(json.dumps({"sparsity": 0.5}))
    assert read_sparsity(tmp_path) is None
    assert read_sparsity(tmp_path / "missing") is None


def test_the_cli_export_writes_a_loadable_checkpoint(tiny_checkpoint, tmp_path, capsys):
    from sparsefit.cli import main

    assert main(["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "e"), "--json",
                 str(tmp_path / "e.json")]) == 0  # fmt: skip
    assert "exported" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["format"] == "hf"
    assert main(["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "e")]) == 2  # exists
    assert main(["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "e"), "--overwrite"]) == 0
    load_model(str(tmp_path / "e"))


@pytest.mark.parametrize("fmt", ["hf", "sparse-bitmask"])
def test_nan_weights_are_never_written(tmp_path, tokenizer, fmt):
    from sparsefit.models.finite import NonFiniteError

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[1, 2] = float("nan")
    match = r"model.layers.0.mlp.gate_proj.(weight|compressed) holds 1 NaN or infinite value"
    with pytest.raises(NonFiniteError, match=match):
        export_checkpoint(model, tokenizer, tmp_path / "out", "src", fmt)
    assert not (tmp_path / "out").exists()


def test_nan_in_a_side_file_is_never_written(tmp_path, tokenizer):
    from sparsefit.models.finite import NonFiniteError
    from sparsefit.models.layout import decoder_linears
    from sparsefit.models.slorb import attach_slorb

    model = tiny_model("llama")
    linears = decoder_linears(model)
    attach_slorb({k: v for k, v in linears.items() if "mlp" in k}, 4)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.slorb.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"tensor model.layers.1.mlp.up_proj.slorb.weight holds 1 NaN"):
        save_checkpoint(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
