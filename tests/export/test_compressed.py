import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsefit.errors import UsageError
from sparsefit.export.compressed import save_quantized
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.quantization import QuantizeConfig, quantize
from sparsefit.quantization.config import SCHEMES
from sparsefit.quantization.scheme import Grid, fake_quantize_per_token
from tests.conftest import run_cli, tiny_model

pytest.importorskip("compressed_tensors", reason="quantized exports need compressed-tensors (sparsefit[export])")


def quantized(scheme, method="rtn", arch="llama", dtype="float32"):
    model = tiny_model(arch)
    oneshot(model, None, OneShotConfig(method="magnitude", sparsity=0.5), progress=False)
    torch.manual_seed(0)
    x = torch.randint(3, 250, (8, 32))
    config = QuantizeConfig(method=method, scheme=scheme, group_size=32, compute_dtype="float32", export_dtype=dtype)
    return model, quantize(model, None, config, calib=x, progress=False)


def own_logits(model, result, ids):
    """sparsefit's dequantized model; with w8a8, inputs of the quantized linears quantized per token."""
    handles = []
    kind, _, _, quantized_inputs = SCHEMES[result.report.scheme]
    if quantized_inputs:
        grid = Grid(kind, 8)
        modules = dict(model.named_modules())
        handles = [
            modules[name].register_forward_pre_hook(lambda m, a: (fake_quantize_per_token(a[0], grid),))
            for name in result.scales
        ]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    return logits


@pytest.mark.parametrize("scheme, method", [("w4a16", "gptq"), ("w4a16", "rtn"), ("w8a16", "rtn"),
                                            ("w8a8-int8", "rtn"), ("w8a8-fp8", "gptq")])  # fmt: skip
def test_export_loads_in_transformers_with_the_same_logits_and_zeros(tmp_path, tokenizer, scheme, method):
    model, result = quantized(scheme, method)
    info = save_quantized(model, tokenizer, tmp_path / "out", result)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == info["format"]
    assert qc["sparsity_config"] == {} and qc["ignore"] == ["lm_head"]
    meta = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert meta["quantization"]["revived_weights"] == 0 and meta["sparsity"]["overall"] >= 0.5
    assert info["ratio_to_dense_bf16"] < 1.0 and info["revived_weights"] == 0

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, 250, (2, 24))
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits  # the first forward decompresses the weights
    assert torch.allclose(theirs, own_logits(model, result, ids), atol=1e-4, rtol=1e-4)
    mine = dict(model.named_modules())
    for name in result.scales:
        w = dict(loaded.named_modules())[name].weight
        assert torch.equal(w == 0, mine[name].weight == 0), name
        assert torch.allclose(w.float(), mine[name].weight, atol=1e-6), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export_dequantizes_to_the_rounded_weights(tmp_path, tokenizer, dtype):
    """Scales are rounded to the export dtype before the codes are chosen: the loaded weights are
    sparsefit's weights rounded to that dtype, zeros included."""
    model, result = quantized("w4a16", "gptq", dtype=dtype)
    save_quantized(model, tokenizer, tmp_path / "out", result)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.dtype == getattr(torch, dtype)
    with torch.no_grad():
        loaded(input_ids=torch.randint(3, 250, (1, 8)))  # the first forward decompresses the weights
    mine = dict(model.named_modules())
    for name in result.scales:
        w = dict(loaded.named_modules())[name].weight
        assert torch.equal(w, mine[name].weight.to(w.dtype)), name
        assert torch.equal(w == 0, mine[name].weight == 0), name


def test_packed_weights_are_smaller_than_dense_bf16(tmp_path, tokenizer):
    model, result = quantized("w4a16", dtype="bfloat16")
    info = save_quantized(model, tokenizer, tmp_path / "out", result)
    linear_bf16_bytes = sum(s.shape[0] * s.shape[1] * 32 * 2 for s in result.scales.values())
    # 4 of 16 bits per linear weight, plus one 2-byte scale per 32 weights
    assert info["weight_bytes"] < info["dense_bf16_bytes"] - 0.65 * linear_bf16_bytes


def test_conv1d_models_are_refused_with_the_fix(tmp_path, tokenizer):
    model, result = quantized("w4a16", arch="gpt2")
    with pytest.raises(UsageError, match="not a torch Linear"):
        save_quantized(model, tokenizer, tmp_path / "out", result)
    assert not (tmp_path / "out").exists()


def test_quantize_command(tmp_path, tiny_checkpoint, data_dir, capsys):
    out, report = tmp_path / "q", tmp_path / "q.json"
    argv = ["quantize", "--model", str(tiny_checkpoint), "--scheme", "w4a16", "--group-size", "32",
            "--num-samples", "4", "--seq-len", "32", "--output", str(out), "--json", str(report)]  # fmt: skip
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    assert "0 pruned weights revived" in stdout
    data = json.loads(report.read_text())
    assert data["method"] == "gptq" and data["export"]["format"] == "pack-quantized"
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    code, _, stderr = run_cli([*argv[:-4], "--output", str(tmp_path / "q48"), "--group-size", "48"], capsys)
    assert code == 2 and "multiple of --group-size 48" in stderr


@pytest.mark.parametrize("scheme", ["w8a8-int8", "w8a8-fp8"])
def test_legacy_sparse_quantized_export_reads_back_with_the_same_weights(tmp_path, tokenizer, scheme):
    """w8a8 codes in the 2:4 bitmask layout of compressed-tensors <= 0.14: sparsefit reads them back."""
    from sparsefit.models import load_model

    model = tiny_model("llama")
    oneshot(model, None, OneShotConfig(method="magnitude", structure="2:4"), progress=False)
    config = QuantizeConfig(method="rtn", scheme=scheme, sparse_format="sparse-24-bitmask")
    result = quantize(model, None, config, progress=False)
    info = save_quantized(model, tokenizer, tmp_path / "out", result)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["format"] == "sparse-24-bitmask" and info["format"].endswith("+sparse-24-bitmask")
    loaded = load_model(tmp_path / "out")
    mine, theirs = dict(model.named_modules()), dict(loaded.named_modules())
    for name in result.scales:
        assert torch.equal(theirs[name].weight, mine[name].weight), name


def test_sparse_format_needs_8_bit_codes():
    with pytest.raises(ValueError, match="w8a8-int8 or w8a8-fp8"):
        QuantizeConfig(scheme="w4a16", sparse_format="sparse-bitmask")


def test_a_tensor_that_overflows_the_export_dtype_is_refused_and_nothing_written(tmp_path, tokenizer):
    """float16 holds up to 65504: an embedding beyond it would be written as inf."""
    from sparsefit.models.finite import NonFiniteError

    model, result = quantized("w4a16", dtype="float16")
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 0] = 1e5
    with pytest.raises(NonFiniteError, match=r"model.embed_tokens.weight holds 1 value .*beyond what float16") as info:
        save_quantized(model, tokenizer, tmp_path / "out", result)
    assert info.value.exit_code == 2 and not (tmp_path / "out").exists()


def test_an_infinite_scale_is_refused_before_anything_is_written(tmp_path, tokenizer):
    from sparsefit.models.finite import NonFiniteError

    model, result = quantized("w4a16", dtype="float16")
    name = next(iter(result.scales))
    result.scales[name][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=rf"tensor {name}.weight_scale holds 1 NaN or infinite value"):
        save_quantized(model, tokenizer, tmp_path / "out", result)
    assert not (tmp_path / "out").exists()


def test_a_compact_int8_checkpoint_with_a_nan_scale_is_refused_naming_the_tensor(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    from sparsefit.models import load_model

    model = tiny_model("llama")
    oneshot(model, None, OneShotConfig(method="magnitude", sparsity=0.5), progress=False)
    config = QuantizeConfig(method="rtn", scheme="w8a8-int8", sparse_format="sparse-bitmask")
    save_quantized(model, tokenizer, tmp_path / "out", quantize(model, None, config, progress=False))
    weights = tmp_path / "out" / "model.safetensors"
    state = load_file(str(weights))
    key = "model.layers.1.mlp.down_proj.weight_scale"
    state[key][3] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(UsageError, match=rf"model.safetensors: tensor {key} holds 1 NaN or infinite value"):
        load_model(tmp_path / "out")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("scheme, method", [("w4a16", "gptq"), ("w8a16", "rtn"), ("w8a8-fp8", "rtn")])
def test_quantized_experts_are_stored_as_codes_and_reload_exactly(tmp_path, tokenizer, arch, scheme, method):
    """Fused expert tensors go to experts.safetensors as int8 / float8 codes (sparse-bitmask layout) with
    their scales; sparsefit's loader restores every expert weight bit for bit, zeros included."""
    from safetensors import safe_open

    from sparsefit.models import load_model

    model, result = quantized(scheme, method, arch)
    assert not any("experts" in p for p in result.report.not_quantized)
    info = save_quantized(model, tokenizer, tmp_path / "out", result)
    assert "experts.safetensors" in info["files"]
    fused = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert not set(fused) & set(f.keys())
    with safe_open(str(tmp_path / "out" / "experts.safetensors"), "pt") as f:
        codes = [f.get_tensor(k) for k in f.keys() if k.endswith(".compressed")]
        assert codes and all(c.dtype == (torch.float8_e4m3fn if scheme == "w8a8-fp8" else torch.int8) for c in codes)
    stored = (tmp_path / "out" / "experts.safetensors").stat().st_size
    # Half the codes kept, a byte each: a quarter of dense bf16, plus masks, row offsets, scales and the
    # header of every slice's tensors (large next to these tiny 32-column matrices).
    assert stored < 0.75 * sum(p.numel() * 2 for p in fused.values())
    loaded = load_model(tmp_path / "out")
    theirs = dict(loaded.named_parameters())
    for name, p in fused.items():
        assert torch.equal(theirs[name], p), name


def test_quantize_command_on_a_mixture_of_experts(tmp_path, tokenizer, data_dir, capsys):
    """The experts are quantized (GPTQ, routed tokens), said so, and the output reloads with them."""
    from sparsefit.models import load_model

    model = tiny_model("mixtral")
    oneshot(model, None, OneShotConfig(method="magnitude", sparsity=0.5), progress=False)
    model.save_pretrained(tmp_path / "in")
    tokenizer.save_pretrained(tmp_path / "in")
    out, report = tmp_path / "q", tmp_path / "q.json"
    argv = ["quantize", "--model", str(tmp_path / "in"), "--scheme", "w4a16", "--group-size", "32",
            "--num-samples", "4", "--seq-len", "32", "--output", str(out), "--json", str(report)]  # fmt: skip
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    assert "0 pruned weights revived" in stdout and "experts.safetensors" in stdout and "not quantized" not in stdout
    data = json.loads(report.read_text())
    assert data["not_quantized"] == [] and "experts.safetensors" in data["export"]["files"]
    loaded = load_model(out)
    for layer in loaded.model.layers:
        w = layer.mlp.experts.down_proj
        assert (w == 0).float().mean() >= 0.5
