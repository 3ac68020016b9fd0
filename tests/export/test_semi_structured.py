"""2:4 kernels for NVIDIA GPUs: which layers qualify, refusals on CPU, the torchao config; the
conversion itself on a GPU (skipped, with the reason shown, where none is present)."""

import pytest
import torch

from sparsefit.errors import UsageError
from sparsefit.export.semi_structured import (
    TokenRowsLinear,
    _token_rows,
    check_device,
    fp8_config,
    to_sparse24,
    two_four_linears,
)
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.pruning.structure import Structure
from tests.conftest import tiny_model


def pruned(structure: str):
    model = tiny_model("llama")
    oneshot(model, None, OneShotConfig(method="magnitude", sparsity=0.5, structure=structure), progress=False)
    return model


def test_structure_holds_checks_every_group():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 5, 0, 6, 7, 0, 0, 8]])
    assert Structure(2, 4).holds(w)
    w[1, 0] = 9  # three nonzeros in the second row's first group
    assert not Structure(2, 4).holds(w)
    assert not Structure(2, 4).holds(torch.ones(2, 6))  # 6 inputs: no whole groups of 4
    assert Structure().holds(torch.ones(2, 6))


def test_only_exact_24_linears_qualify():
    model = pruned("2:4")
    found = two_four_linears(model)
    assert len(found) == 21  # 3 blocks x 7 linears
    name = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        found[name].weight[0, :4] = 1.0  # one group now has four nonzeros
    assert name not in two_four_linears(model) and len(two_four_linears(model)) == 20
    assert two_four_linears(pruned("unstructured")) == {}


def test_token_rows_linears_compute_the_same_on_2d_inputs():
    """torchao's FP8 2:4 kernel takes (tokens, features) only: the re-classed linears flatten and restore."""
    model = pruned("2:4")
    ids = torch.randint(3, 250, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        names = set(two_four_linears(model))
        _token_rows(model, names)
        got = model(input_ids=ids).logits
    assert all(type(model.get_submodule(n)) is TokenRowsLinear for n in names)
    assert set(two_four_linears(model)) == names  # still linears, same parameter names
    assert torch.equal(got, expected)


def test_conversion_needs_a_bf16_model_on_a_gpu():
    with pytest.raises(UsageError, match="--dtype bfloat16"):
        to_sparse24(pruned("2:4"), "fp8")
    with pytest.raises(UsageError, match="--device cuda"):
        to_sparse24(pruned("2:4").to(torch.bfloat16), "fp8")
    with pytest.raises(UsageError, match="unknown 2:4 kernel 'int4'"):
        check_device("int4", "cpu")


def test_fp8_config_is_per_row_with_cutlass_24_packing():
    pytest.importorskip("torchao", reason="torchao (sparsefit[gpu]) is not installed")
    from torchao.quantization import PerRow

    config = fp8_config()
    # CUTLASS's packing: SPARSE_2D_DATA_2D_METADATA since torchao 0.18, SPARSE_CUTLASS before
    assert config.packing_format.value in ("sparse_2d_data_2d_metadata", "sparse_cutlass")
    assert all(isinstance(g, PerRow) for g in config.granularity)
    assert config.activation_dtype == config.weight_dtype == torch.float8_e4m3fn


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


@pytest.mark.parametrize("kind, need", [("bf16", (8, 0)), ("fp8", (9, 0))])
def test_converted_model_computes_what_the_24_model_does(kind, need):
    if _capability() < need:
        pytest.skip(f"2:4 {kind} kernels need a CUDA GPU of compute capability {need[0]}.{need[1]}")
    if kind == "fp8":
        pytest.importorskip("torchao", reason="torchao (sparsefit[gpu]) is not installed")
    model = pruned("2:4").to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, 250, (4, 64), device="cuda")
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        info = to_sparse24(model, kind)
        got = model(input_ids=ids).logits.float()
    assert info["converted"] + len(info["skipped"]) == 21 and info["converted"] > 0
    if kind == "bf16":  # the same bf16 values, only stored compressed
        assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2)
    else:
        # FP8 e4m3 keeps 3 mantissa bits of weights and activations: through this tiny model's three
        # blocks the logits move by about an eighth of their mean size.
        assert (got - expected).abs().mean() < 0.2 * expected.abs().mean()
        # The sparse kernel itself: the same per-row FP8 quantization through torchao's dense FP8 kernel.
        # The two GEMMs round and accumulate differently (cuBLAS fast accumulation against CUTLASS's
        # sparse kernel): on an H200 the logits differ by about 5% of their mean size, against 13% from bf16.
        from torchao.quantization import quantize_

        dense = pruned("2:4").to("cuda", torch.bfloat16).eval()
        names = set(two_four_linears(dense))
        quantize_(dense, fp8_config(two_four=False), filter_fn=lambda m, n: n in names)
        with torch.no_grad():
            reference = dense(input_ids=ids).logits.float()
        assert (got - reference).abs().mean() < 0.1 * reference.abs().mean()
