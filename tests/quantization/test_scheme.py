import pytest
import torch

from sparsefit.quantization.scheme import Grid, fake_quantize_per_token, group_view, quantize_rtn


def test_integer_grid_codes_are_integers_in_range_and_zero_stays_zero():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[w.abs() < 0.5] = 0.0
    grid = Grid("int", 4, 32)
    q, scale = quantize_rtn(w, grid)
    assert scale.shape == (8, 2)
    codes = group_view(q, 32) / scale.unsqueeze(-1)
    assert torch.equal(grid.codes(q, scale.repeat_interleave(32, 1)), codes.round().reshape(8, 64))
    assert torch.allclose(codes, codes.round(), atol=1e-5) and -8 <= codes.round().min() <= codes.round().max() <= 7
    assert torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))
    # The largest magnitude of each group maps to 7.5 steps: clipped to the top code (as compressed-tensors does)
    amax = group_view(w, 32).abs().amax(-1)
    assert torch.allclose(scale, amax / 7.5)
    # Round to nearest: no weight is more than half a step away, but the clipped maxima
    err = (group_view(q - w, 32).abs() / scale.unsqueeze(-1)).flatten()
    assert (err <= 0.5 + 1e-5).sum() >= err.numel() - 2 * 8 and err.max() <= 1.0 + 1e-5


def test_values_on_the_grid_round_trip_exactly():
    """The export recomputes codes as round(w / scale): a dequantized weight must give its code back."""
    scale = torch.tensor([[0.25], [0.3]])
    codes = torch.tensor([[-8.0, -3, 0, 7], [1, 2, -1, 7]])
    grid = Grid("int", 4, None)
    w = grid.fake_quantize(codes * scale, scale)
    assert torch.equal(grid.codes(w, scale), codes) and torch.equal(w, codes * scale)


def test_fp8_grid_matches_float8_e4m3_rounding():
    torch.manual_seed(1)
    w = torch.randn(4, 16)
    grid = Grid("float", 8)
    q, scale = quantize_rtn(w, grid)
    expected = (w / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(q, expected)
    assert torch.allclose(scale.squeeze(1), w.abs().amax(1) / 448)


def test_all_zero_group_gets_a_finite_scale_and_zero_codes():
    w = torch.zeros(2, 8)
    w[1, :4] = 1.0
    q, scale = quantize_rtn(w, Grid("int", 8, 4))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(q[0], torch.zeros(8)) and torch.equal(q[1, 4:], torch.zeros(4))


def test_scales_are_rounded_to_their_storage_dtype():
    torch.manual_seed(2)
    w = torch.randn(16, 32)
    _, scale = quantize_rtn(w, Grid("int", 4, 16), scale_dtype=torch.bfloat16)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())


def test_per_token_activation_quantization_scales_each_token():
    x = torch.tensor([[[1.0, -2.0, 0.5], [100.0, 50.0, -25.0]]])
    q = fake_quantize_per_token(x, Grid("int", 8))
    for row, qrow in zip(x[0], q[0]):
        scale = row.abs().max() / 127.5
        assert torch.allclose(qrow, (row / scale).round().clamp(-128, 127) * scale)


@pytest.mark.parametrize("bad", [dict(kind="float", bits=4), dict(kind="int", bits=9), dict(group_size=0)])
def test_invalid_grids_are_refused(bad):
    with pytest.raises(ValueError):
        Grid(**bad)


def test_columns_must_divide_into_groups():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_rtn(torch.randn(2, 10), Grid("int", 4, 4))
