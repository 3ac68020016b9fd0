"""The 4-bit base: packing round trip, the shared integer grid, zeros kept, residual init exact."""

import pytest
import torch
from torch.nn.utils import parametrize

from sparsefit.models.layout import weight_as_out_in
from sparsefit.models.row_deltas import attach_row_deltas, merge_row_deltas
from sparsefit.quantization.scheme import Grid, quantize_rtn
from sparsefit.training.adapters.quantized import (
    base_bytes,
    dequantize_base,
    pack_int4,
    quantize_base_,
    quantized_modules,
    unpack_int4,
)
from sparsefit.training.masks import decoder_linears
from tests.conftest import tiny_model
from tests.models.test_row_deltas import sparse_linears


def test_pack_round_trip():
    codes = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed), codes)
    with pytest.raises(ValueError, match="even"):
        pack_int4(codes[:, :3])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_base_is_the_shared_grid_and_keeps_zeros(arch):
    model = tiny_model(arch)
    _, keep = sparse_linears(model)
    linears = decoder_linears(model)
    dense = {n: weight_as_out_in(m).clone() for n, m in linears.items()}
    before = base_bytes(model)
    residuals = quantize_base_(linears, group_size=16)
    assert len(quantized_modules(model)) == len(linears)
    assert base_bytes(model) < before
    for name, module in linears.items():
        weight = module.weight.t() if arch == "gpt2" else module.weight  # computed on the fly
        expected, _ = quantize_rtn(dense[name], Grid("int", 4, 16))
        assert torch.equal(weight, expected)
        assert not (weight[~keep[name]] != 0).any()
        assert torch.equal(residuals[name], dense[name] - expected)
    ids = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        logits = model(ids).logits
    assert dequantize_base(model) == len(linears)
    assert not any(parametrize.is_parametrized(m) for m in linears.values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_residual_init_reproduces_the_unquantized_rows():
    model = tiny_model("llama")
    linears = decoder_linears(model)
    dense = {n: weight_as_out_in(m).clone() for n, m in linears.items()}
    residuals = quantize_base_(linears, group_size=16)
    rows = {n: torch.tensor([0, 5, 7]) for n in linears}
    attach_row_deltas(linears, rows, init={n: residuals[n][rows[n]] for n in linears})
    dequantize_base(model)
    merge_row_deltas(model)
    for name, module in linears.items():
        w = weight_as_out_in(module)
        assert torch.allclose(w[rows[name]], dense[name][rows[name]], rtol=0, atol=1e-7)  # one float addition
        others = torch.ones(len(w), dtype=torch.bool)
        others[rows[name]] = False
        assert not torch.allclose(w[others], dense[name][others])  # still quantized elsewhere
