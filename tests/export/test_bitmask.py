import json

import numpy
import pytest
import torch
from safetensors.torch import save_file

from sparsefit.errors import UsageError
from sparsefit.export import export_checkpoint
from sparsefit.export.bitmask import compress_24_bitmask, compress_bitmask
from sparsefit.models import load_model
from sparsefit.models.bitmask import decompress, pack_bitmask, sparse_format, unpack_bitmask
from sparsefit.pruning import OneShotConfig, oneshot
from tests.conftest import tiny_model


@pytest.mark.parametrize("cols", [8, 13, 64])
def test_bitmask_packing_is_numpy_little_endian_packbits(cols):
    torch.manual_seed(cols)
    mask = torch.rand(5, cols) > 0.5
    packed = pack_bitmask(mask)
    assert torch.equal(packed, torch.from_numpy(numpy.packbits(mask.numpy(), axis=-1, bitorder="little")))
    assert torch.equal(unpack_bitmask(packed, (5, cols)), mask)


def sparse_weight(dtype, two_four=False):
    torch.manual_seed(1)
    w = torch.randn(6, 16)
    if two_four:
        groups = w.reshape(6, 4, 4)
        drop = groups.abs().argsort(-1)[..., :2]
        groups.scatter_(-1, drop, 0.0)
    else:
        w[torch.rand_like(w) > 0.4] = 0.0
    w[0, 0] = -0.0  # a negative zero must come back as +0.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("fmt", ["sparse-bitmask", "sparse-24-bitmask"])
def test_round_trip_is_bit_exact_and_negative_zero_becomes_positive(dtype, fmt):
    w = sparse_weight(torch.float32, two_four=fmt == "sparse-24-bitmask")
    w = (w * 10).round().to(dtype) if dtype == torch.int8 else w.to(dtype)
    parts = (compress_bitmask if fmt == "sparse-bitmask" else compress_24_bitmask)(w)
    back = decompress(fmt, parts)
    raw = (lambda t: t.view(torch.uint8)) if dtype == torch.float8_e4m3fn else (lambda t: t)
    expected = raw(w).clone()
    if dtype.is_floating_point:
        expected[0, 0] = 0  # +0.0's bits
    assert back.dtype == dtype and torch.equal(raw(back), expected)


def test_sparse_bitmask_parts_follow_the_layout():
    w = sparse_weight(torch.float32)
    parts = compress_bitmask(w)
    nonzero = w != 0
    assert torch.equal(parts["compressed"], w[nonzero])
    counts = nonzero.sum(-1)
    assert torch.equal(parts["row_offsets"], torch.cumsum(counts, 0) - counts)
    assert parts["shape"].tolist() == [6, 16] and parts["bitmask"].shape == (6, 2)


def test_24_parts_follow_the_layout_and_non_24_weights_are_refused():
    w = sparse_weight(torch.float32, two_four=True)
    parts = compress_24_bitmask(w)
    assert parts["compressed"].shape == (6, 8) and parts["shape"].tolist() == [[6], [16]]
    kept = unpack_bitmask(parts["bitmask"], (6, 16))
    assert torch.equal(kept.reshape(6, 4, 4).sum(-1), torch.full((6, 4), 2))
    w[1, :3] = 1.0
    with pytest.raises(ValueError, match="not 2:4"):
        compress_24_bitmask(w)


def pruned(structure):
    model = tiny_model("llama")
    oneshot(model, None, OneShotConfig(method="magnitude", sparsity=0.5, structure=structure), progress=False)
    return model


@pytest.mark.parametrize("fmt, structure", [("sparse-bitmask", "unstructured"), ("sparse-24-bitmask", "2:4")])
def test_export_and_load_give_the_same_model_in_fewer_bytes(tmp_path, tokenizer, fmt, structure):
    model = pruned(structure)
    info = export_checkpoint(model, tokenizer, tmp_path / "sparse", "tiny", fmt)
    plain = export_checkpoint(model, tokenizer, tmp_path / "plain", "tiny", "hf")
    assert info["bytes"] < plain["bytes"]
    config = json.loads((tmp_path / "sparse" / "config.json").read_text())
    assert sparse_format(config) == fmt
    loaded = load_model(tmp_path / "sparse")
    ids = torch.randint(3, 250, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_24_export_of_a_model_that_is_not_24_is_a_usage_error(tmp_path, tokenizer):
    with pytest.raises(UsageError, match="--structure 2:4"):
        export_checkpoint(pruned("unstructured"), tokenizer, tmp_path / "out", "tiny", "sparse-24-bitmask")
    assert not (tmp_path / "out").exists()


def test_legacy_quantized_24_checkpoint_loads_dequantized(tmp_path, tokenizer):
    """A W8A8 2:4 checkpoint as compressed-tensors 0.14 wrote it: int8 codes in the 2:4 layout, a
    per-channel weight_scale and a static input scale beside them, under `compression_config`."""
    model = pruned("2:4")
    model.save_pretrained(tmp_path / "dense")
    state = dict(model.state_dict())
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = state.pop(f"{name}.weight")
            scale = w.abs().amax(1, keepdim=True) / 127
            codes = (w / scale).round().clamp(-128, 127).to(torch.int8)
            expected[name] = codes.float() * scale
            state.update({f"{name}.{k}": v for k, v in compress_24_bitmask(codes).items()})
            state[f"{name}.weight_scale"] = scale
            state[f"{name}.input_scale"] = torch.tensor([0.1])
    state.pop("lm_head.weight", None)
    out = tmp_path / "legacy"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    config["compression_config"] = {
        "quant_method": "compressed-tensors", "format": "int-quantized",
        "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"]},
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_model(out)
    modules = dict(loaded.named_modules())
    for name, w in expected.items():
        assert torch.equal(modules[name].weight, w), name


def test_unknown_sparse_format_is_refused_by_name(tmp_path, tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "sparsity_config": {"format": "marlin-24"}}
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="sparse format 'marlin-24'"):
        load_model(tiny_checkpoint)


def test_legacy_checkpoint_loads_by_hub_id(tmp_path, tokenizer, monkeypatch):
    """A hub id of a bitmask checkpoint: its config is read first, then its configs and safetensors
    (only) are fetched and decompressed. Here the hub is a local cache read offline."""
    import huggingface_hub.constants as hub

    model = pruned("unstructured")
    snapshot = tmp_path / "hub" / "models--org--sparse" / "snapshots" / ("0" * 40)
    export_checkpoint(model, tokenizer, snapshot, "tiny", "sparse-bitmask")
    (snapshot / "pytorch_model.bin").write_bytes(b"never fetched")
    (tmp_path / "hub" / "models--org--sparse" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--sparse" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    fetched = []
    import huggingface_hub

    original = huggingface_hub.snapshot_download
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda *a, **k: fetched.append(k["allow_patterns"]) or original(*a, **k)
    )
    loaded = load_model("org/sparse")
    assert fetched == [["*.json", "*.safetensors"]]
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UsageError, match="org/missing"):
        load_model("org/missing")
