import pytest
import torch

from sparsefit.pruning.sparsegpt import inverse_hessian
from sparsefit.quantization.gptq import quantize_gptq
from sparsefit.quantization.scheme import Grid, group_view, quantize_rtn


def correlated_inputs(n=512, cols=64, seed=0):
    torch.manual_seed(seed)
    mix = torch.randn(cols, cols) / cols**0.5 + torch.eye(cols)
    return torch.randn(n, cols) @ mix


def hessian_of(x):
    return 2 * x.t() @ x / x.shape[0]


def reference_gptq(w, U, grid, keep):
    """GPTQ without lazy batching: after each column, every column to its right gets its update."""
    W, Q = w.clone() * keep, torch.zeros_like(w)
    group = grid.group_size or w.shape[1]
    for j in range(w.shape[1]):
        if j % group == 0:
            scale = grid.scale((W[:, j : j + group] * keep[:, j : j + group]).abs().amax(1))
        Q[:, j] = grid.fake_quantize(W[:, j], scale) * keep[:, j]
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None]
    return Q


# Lazy batches (block 16 of 64 columns) add the same updates in another order; with the 4-bit grid,
# a value that float rounding puts on the other side of a rounding boundary flips a code, so the
# grouped grid is compared exactly with one block (its group scales) and in loss with four.
@pytest.mark.parametrize("grid, block", [(Grid("int", 4, 16), 64), (Grid("int", 8, None), 16), (Grid("float", 8), 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_lazy_batches_give_the_one_column_at_a_time_result(grid, block, masked):
    x = correlated_inputs()
    torch.manual_seed(3)
    w = torch.randn(24, 64)
    keep = torch.rand_like(w) > 0.5 if masked else torch.ones_like(w, dtype=torch.bool)
    U, dead = inverse_hessian(hessian_of(x))
    q, _ = quantize_gptq(w, U, dead, grid, keep if masked else None, block_size=block)
    assert torch.allclose(q, reference_gptq(w, U, grid, keep), atol=1e-5)


def test_grouped_grid_with_lazy_batches_matches_the_reference_loss():
    x = correlated_inputs()
    torch.manual_seed(3)
    w = torch.randn(24, 64)
    keep = torch.rand_like(w) > 0.5
    U, dead = inverse_hessian(hessian_of(x))
    grid = Grid("int", 4, 16)
    q, _ = quantize_gptq(w, U, dead, grid, keep, block_size=16)
    reference = reference_gptq(w, U, grid, keep)

    def loss(v):
        return ((v - w * keep) @ x.t()).square().sum().item()

    assert (q - reference).abs().le(1e-5).float().mean() > 0.97
    assert loss(q) == pytest.approx(loss(reference), rel=0.02)


def test_pruned_weights_stay_exactly_zero_and_codes_lie_on_the_grid():
    x = correlated_inputs()
    torch.manual_seed(4)
    w = torch.randn(32, 64)
    keep = torch.rand_like(w) > 0.5
    w = w * keep
    U, dead = inverse_hessian(hessian_of(x))
    grid = Grid("int", 4, 32)
    q, scale = quantize_gptq(w, U, dead, grid, keep, block_size=32)
    assert (q[~keep] == 0).all() and q[~keep].signbit().logical_not().all()  # +0.0, never -0.0
    codes = group_view(q, 32) / scale.unsqueeze(-1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and -8 <= codes.round().min() <= codes.round().max() <= 7


# With half the weights pruned, only the kept half can absorb the rounding errors: less to gain.
@pytest.mark.parametrize("masked, bound", [(False, 0.7), (True, 0.92)])
def test_gptq_loses_less_output_than_round_to_nearest_and_spends_it_on_kept_weights(masked, bound):
    x = correlated_inputs(n=2048, cols=64)
    torch.manual_seed(5)
    w = torch.randn(32, 64)
    keep = torch.rand_like(w) > 0.5 if masked else torch.ones_like(w, dtype=torch.bool)
    w = w * keep
    U, dead = inverse_hessian(hessian_of(x))
    grid = Grid("int", 4, 32)
    gptq, _ = quantize_gptq(w, U, dead, grid, keep)
    rtn, _ = quantize_rtn(w, grid)

    def loss(q):
        return ((q - w) @ x.t()).square().sum().item()

    assert loss(gptq) < bound * loss(rtn)
    assert ((gptq != 0) & ~keep).sum() == 0 and ((rtn != 0) & ~keep).sum() == 0


def test_identity_hessian_is_round_to_nearest():
    """With uncorrelated inputs there is nothing to compensate: GPTQ is round to nearest."""
    torch.manual_seed(6)
    w = torch.randn(8, 32)
    U, dead = inverse_hessian(torch.eye(32))
    grid = Grid("int", 4, 16)
    assert torch.allclose(quantize_gptq(w, U, dead, grid)[0], quantize_rtn(w, grid)[0])


def test_dead_inputs_get_zero_weights():
    x = correlated_inputs(cols=32)
    x[:, 5] = 0
    torch.manual_seed(7)
    w = torch.randn(4, 32)
    U, dead = inverse_hessian(hessian_of(x))
    q, _ = quantize_gptq(w, U, dead, Grid("int", 8, None))
    assert dead[5] and (q[:, 5] == 0).all()
