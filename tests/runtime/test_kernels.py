"""The packed kernels against a float64 reference: every instruction set this CPU runs, ragged
shapes, densities from 0 to 1, batches 1 to 33, both value types and both layouts."""

from __future__ import annotations

import pytest
import torch

from sparsefit.runtime import SparseLinear, pack, unpack
from sparsefit.runtime.kernels import ISAS, input_dtype, load_kernels
from sparsefit.runtime.packing import int8_codes

KERNELS = load_kernels()
RUNNABLE = [isa for isa in ISAS if KERNELS.supports(isa)]
pytestmark = pytest.mark.skipif(not KERNELS.available, reason=f"kernels unavailable: {KERNELS.reason}")

SHAPES = [(1, 1), (7, 63), (13, 65), (64, 128), (33, 200), (100, 577)]
DENSITIES = [0.0, 0.01, 0.5, 0.7, 0.9, 1.0]


def test_this_cpu_runs_the_avx2_path_at_least():
    # CI machines all have AVX2; an AVX-512 machine must run both rows of the table.
    assert "avx2" in RUNNABLE
    if KERNELS.isa in ("avx512bf16", "avx512"):
        assert {"avx512", "avx2"} <= set(RUNNABLE)


def _weight(rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("values", ["bfloat16", "int8"])
@pytest.mark.parametrize("layout", ["bitmask", "dense"])
def test_kernel_matches_float64_reference(isa, values, layout):
    worst = 0.0
    for i, (rows, cols) in enumerate(SHAPES):
        for j, density in enumerate(DENSITIES):
            w, b = _weight(rows, cols, density, 10 * i + j), torch.randn(rows)
            layer = SparseLinear.from_weight(w, b, values, layout, isa, row_block=[4, 8, 16][(i + j) % 3])
            exact = layer.to_dense().double()
            for batch in (1, 2, 5, 16, 17, 33):
                x = torch.randn(batch, cols)
                xr = x.to(input_dtype(isa, values)).double()  # what the kernel multiplies
                ref = xr @ exact.T + b.double()
                bound = xr.abs() @ exact.abs().T + b.double().abs() + 1e-30
                err = ((layer(x).double() - ref).abs() / bound).max().item()
                worst = max(worst, err)
    assert worst < 2e-6  # fp32 accumulation over at most 577 terms


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("values", ["bfloat16", "int8"])
def test_a_row_is_bitwise_the_same_alone_or_in_any_batch(isa, values):
    w = _weight(50, 300, 0.4, 1)
    layer = SparseLinear.from_weight(w, torch.randn(50), values, "bitmask", isa)
    x = torch.randn(37, 300)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(37)])
    for batch in (2, 7, 16, 37):
        together = torch.cat([layer(x[i : i + batch]) for i in range(0, 37, batch)])
        assert torch.equal(together, alone)


@pytest.mark.parametrize("values", ["bfloat16", "int8"])
def test_instruction_sets_agree(values):
    if len(RUNNABLE) < 2:
        pytest.skip("this CPU runs one instruction set")
    w, x = _weight(40, 130, 0.5, 2), torch.randn(3, 130)
    # Every row gets the inputs in the precision the strictest row takes them in.
    x = x.bfloat16().float() if any(input_dtype(isa, values) == torch.bfloat16 for isa in RUNNABLE) else x
    outs = [SparseLinear.from_weight(w, None, values, "bitmask", isa)(x) for isa in RUNNABLE]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


def test_bf16_packing_round_trips_exactly_and_stores_only_the_kept_values():
    w = _weight(100, 577, 0.3, 3)
    p = pack(w, "bfloat16")
    assert torch.equal(unpack(p), w.bfloat16().float())
    assert p.kept == int((w.bfloat16() != 0).sum())
    masks = (100 + 7) // 8 * 8 * ((577 + 63) // 64) * 8
    assert p.nbytes == masks + (p.kept + 64) * 2 + (p.block_offsets.numel() * 8)


def test_int8_codes_keep_zeros_and_use_given_scales():
    w = _weight(20, 70, 0.5, 4)
    codes, scales = int8_codes(w)
    assert (codes[w == 0] == 0).all() and codes.abs().max() <= 127  # a pruned weight stays an exact zero
    p = pack(w, "int8")
    torch.testing.assert_close(unpack(p), codes.float() * scales[:, None], rtol=0, atol=0)
    given = torch.full((20,), 0.01)
    assert torch.equal(pack(w, "int8", scales=given).scales, given)
    with pytest.raises(ValueError, match="finite positive"):
        pack(w, "int8", scales=torch.zeros(20))


def test_packing_refuses_non_finite_weights_and_bad_options():
    w = torch.ones(4, 4)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        pack(w)
    with pytest.raises(ValueError, match="row_block"):
        pack(torch.ones(4, 4), row_block=3)
    with pytest.raises(ValueError, match="scales are for int8"):
        pack(torch.ones(4, 4), scales=torch.ones(4))


def test_layer_shapes_bias_and_auto_layout():
    w = _weight(24, 96, 0.5, 5)
    layer = SparseLinear.from_linear(torch.nn.Linear(96, 24).requires_grad_(False).to(torch.float32))
    assert layer.layout == "dense"  # a dense random Linear: above the crossover
    sparse = SparseLinear.from_weight(w)
    assert sparse.layout == "bitmask" and sparse.value_type == "bfloat16"
    x = torch.randn(2, 3, 96)
    assert sparse(x).shape == (2, 3, 24)
    assert sparse(x.to(torch.bfloat16)).dtype == torch.bfloat16
    xr = x.to(input_dtype(sparse.isa, sparse.value_type)).float()  # what the kernel multiplies
    torch.testing.assert_close(sparse(x), xr @ sparse.to_dense().T, rtol=1e-5, atol=1e-5)


def test_the_operator_is_traceable():
    layer = SparseLinear.from_weight(_weight(16, 64, 0.5, 6), torch.randn(16))
    x = torch.randn(3, 64)
    args = (x, layer.masks, layer.values, layer.block_offsets, None, layer.bias, 16, 64, 8, layer.isa)
    torch.library.opcheck(torch.ops.sparsefit.linear.default, args)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))


def test_wrong_arguments_are_refused_by_the_operator():
    layer = SparseLinear.from_weight(_weight(16, 64, 0.5, 7))
    with pytest.raises(RuntimeError, match="features"):
        layer(torch.randn(2, 65))
    with pytest.raises(RuntimeError, match="masks"):
        torch.ops.sparsefit.linear(torch.randn(1, 64), layer.masks[:-1], layer.values, layer.block_offsets,
                                   None, None, 16, 64, 8, layer.isa)  # fmt: skip
