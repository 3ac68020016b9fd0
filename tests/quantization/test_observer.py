import pytest
import torch

from sparsefit.quantization.observer import MSE_NORM, choose_scale
from sparsefit.quantization.scheme import Grid


def brute_force(groups, grid, dtype):
    """Every candidate ratio (1.00, 0.99, ..., 0.80: the grid pinned here, not read from the code) scored
    in float64; the first of the lowest errors wins (as a strict `<` does)."""
    amax = groups.abs().amax(-1)
    best, best_err = None, None
    for i in range(21):
        s = grid.scale(amax * (1 - i / 100), dtype).double()
        q = (groups.double() / s[..., None]).round().clamp(grid.qmin, grid.qmax) * s[..., None]
        err = (q - groups.double()).abs().pow(MSE_NORM).sum(-1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best.float()


@pytest.mark.parametrize("bits, dtype", [(4, torch.float32), (4, torch.bfloat16), (8, torch.float32)])
def test_mse_picks_the_candidate_with_the_least_error(bits, dtype):
    torch.manual_seed(0)
    groups = torch.randn(16, 8, 32) * torch.rand(16, 8, 1)
    grid = Grid("int", bits, 32)
    chosen = choose_scale(groups, grid, "mse", dtype)
    expected = brute_force(groups, grid, dtype)
    assert (chosen == expected).float().mean() > 0.98  # float32 vs float64 error sums may tie differently
    assert torch.equal(chosen, chosen.to(dtype).float())  # stored exactly in its dtype


def test_mse_clips_gaussian_groups_at_4_bits_and_loses_less_than_minmax():
    torch.manual_seed(1)
    groups = torch.randn(64, 4, 64)
    grid = Grid("int", 4, 64)
    mse, minmax = choose_scale(groups, grid, "mse"), choose_scale(groups, grid, "minmax")
    assert (mse <= minmax).all() and (mse >= 0.8 * minmax - 1e-6).all()
    assert (mse < minmax).float().mean() > 0.5  # most gaussian groups gain from clipping their tails

    def err(s):
        return (grid.fake_quantize(groups, s.unsqueeze(-1)) - groups).square().sum()

    assert err(mse) < 0.95 * err(minmax)


def test_an_all_zero_group_gets_scale_one_and_every_scale_is_finite():
    torch.manual_seed(2)
    groups = torch.randn(8, 2, 32)
    groups[0, 0] = 0
    grid = Grid("int", 4, 32)
    scales = choose_scale(groups, grid, "mse")
    assert scales[0, 0] == 1.0  # an all-zero group: scale 1, codes 0
    assert torch.isfinite(scales).all() and (scales > 0).all()


def test_unknown_observer_is_refused():
    with pytest.raises(ValueError, match="observer"):
        choose_scale(torch.randn(2, 4), Grid("int", 4, None), "absmax")
