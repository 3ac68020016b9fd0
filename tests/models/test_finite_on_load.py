"""Every checkpoint reader refuses NaN / inf weights and scales as it reads them, in one line
naming the file and the tensor: a plain HF directory, a sparse-bitmask export, a quantized
(compressed-tensors) export, the runtime's tensor reader and a training checkpoint."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsefit.errors import UsageError
from sparsefit.export import export_checkpoint
from sparsefit.models import load_model
from sparsefit.models.finite import refuse_non_finite_input
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.runtime.checkpoint import CheckpointTensors
from tests.conftest import run_cli, tiny_model


def poison(file, key, value=float("nan")):
    """Rewrite safetensors `file` with one element of tensor `key` set to `value` (metadata kept)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    t = tensors[key].clone()
    t.view(-1)[t.numel() // 2] = value
    tensors[key] = t
    save_file(tensors, str(file), metadata=meta)


def test_refuse_non_finite_input_names_file_and_tensor():
    refuse_non_finite_input({"a": torch.ones(3), "i": torch.arange(4)}, "f.safetensors")
    with pytest.raises(UsageError, match=r"^x\.safetensors: tensor b holds 1 NaN or infinite value; .*damaged"):
        refuse_non_finite_input({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, "x.safetensors")
    with pytest.raises(UsageError, match=r"^file-of-b: tensor b "):
        refuse_non_finite_input([("b", torch.tensor([float("nan")]))], lambda name: f"file-of-{name}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_plain_checkpoint_with_a_nan_weight_is_refused_naming_file_and_tensor(tmp_path, value, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    key = "model.layers.0.mlp.down_proj.weight"
    poison(tmp_path / "m" / "model.safetensors", key, value)
    with pytest.raises(UsageError, match=rf"model\.safetensors: tensor {key} holds 1 NaN or infinite value"):
        load_model(tmp_path / "m")
    capsys.readouterr()  # what saving the model printed
    code, _, err = run_cli(["export", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and key in err and "unexpected" not in err


def bitmask_export(tmp_path, tokenizer):
    model = tiny_model("llama")
    oneshot(model, None, OneShotConfig(method="magnitude", sparsity=0.5), progress=False)
    export_checkpoint(model, tokenizer, tmp_path / "sparse", "tiny", "sparse-bitmask")
    return tmp_path / "sparse"


@pytest.mark.parametrize(
    "key", ["model.layers.0.self_attn.q_proj.compressed", "model.norm.weight", "model.embed_tokens.weight"]
)
def test_a_bitmask_checkpoint_with_a_nan_is_refused_by_both_readers(tmp_path, tokenizer, key):
    folder = bitmask_export(tmp_path, tokenizer)
    poison(folder / "model.safetensors", key)
    with pytest.raises(UsageError, match=rf"model\.safetensors: tensor {key} holds 1 NaN"):
        load_model(folder)
    reader = CheckpointTensors(folder)
    with pytest.raises(UsageError, match=rf"model\.safetensors: tensor {key} holds 1 NaN"):
        if key.endswith(".compressed"):
            reader.linear(key.removesuffix(".compressed"))
        else:
            reader.tensor(key)


def test_the_runtime_reader_checks_each_run_of_rows(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    key = "model.embed_tokens.weight"
    poison(tmp_path / "m" / "model.safetensors", key, float("-inf"))
    reader = CheckpointTensors(tmp_path / "m")
    with pytest.raises(UsageError, match=rf"tensor {key} holds 1 NaN or infinite value"):
        list(reader.row_chunks(key, 16))
    assert reader.tensor("model.norm.weight").isfinite().all()  # the others still read


def test_a_quantized_checkpoint_with_an_infinite_scale_is_refused(tmp_path, tokenizer):
    pytest.importorskip("compressed_tensors")
    from sparsefit.export.compressed import save_quantized
    from tests.export.test_compressed import quantized

    model, result = quantized("w8a16")
    save_quantized(model, tokenizer, tmp_path / "q", result)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("weight_scale"))
    poison(tmp_path / "q" / "model.safetensors", key, float("inf"))
    with pytest.raises(UsageError, match=rf"tensor {key} holds 1 NaN or infinite value"):
        load_model(tmp_path / "q")
