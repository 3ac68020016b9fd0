"""Least-squares reconstruction for a fixed mask, checked against a direct solve per row."""

import pytest
import torch

from sparsefit.pruning.reconstruct import _top_eigenpairs, low_rank_preconditioner, reconstruct
from sparsefit.pruning.structure import UNSTRUCTURED, Structure
from tests.pruning.test_algorithms import ROWS, hessian, layer_problem, recon_error, solve_all


def exact_refit(W, keep, H, damp=0.01):
    """Row by row: H_KK w'_K = (H w)_K on the dampened H, by a direct solve in float64."""
    W, H = W.double(), H.double()
    Hd = H.clone()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        k = keep[r].nonzero().squeeze(1)
        out[r, k] = torch.linalg.solve(Hd[k][:, k], (W[r] @ Hd)[k])
    return out.float()


@pytest.mark.parametrize("structure", [UNSTRUCTURED, Structure(2, 4)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_reaches_the_least_squares_weights_for_the_mask(method, structure):
    W, X = layer_problem(seed=1)
    H = hessian(X)
    pruned, keep = solve_all(W, X, 0.5, structure)[method]
    refit = reconstruct(W, pruned, keep, H, iters=100)
    assert torch.allclose(refit, exact_refit(W, keep, H), atol=1e-4, rtol=1e-4)
    assert (refit[~keep] == 0).all()
    assert recon_error(W, refit, X) < recon_error(W, pruned, X)


@pytest.mark.parametrize("structure", [UNSTRUCTURED, Structure(2, 4)])
def test_a_few_steps_already_improve_every_method(structure):
    W, X = layer_problem(seed=2)
    H = hessian(X)
    for method, (pruned, keep) in solve_all(W, X, 0.5, structure).items():
        errors = [recon_error(W, reconstruct(W, pruned, keep, H, iters=i), X) for i in (0, 5, 20)]
        assert errors[0] == pytest.approx(recon_error(W, pruned, X))  # 0 steps: the method's weights
        assert errors[2] < errors[1] < errors[0], (method, errors)


def test_mask_is_kept_and_dead_inputs_go_to_zero():
    W, X = layer_problem(dead=(3, 17))
    H = hessian(X)
    _, keep = solve_all(W, X, 0.5)["wanda"]
    keep[:, [3, 17]] = True  # a mask that keeps the dead inputs
    refit = reconstruct(W, W * keep, keep, H, iters=200)
    assert ((refit != 0) <= keep).all()
    assert refit[:, [3, 17]].abs().max() < 1e-4  # no signal: the damped target pulls them to zero


def test_dtype_and_inputs_untouched():
    W, X = layer_problem()
    H = hessian(X)
    pruned, keep = solve_all(W, X, 0.5)["sparsegpt"]
    W16, P16 = W.to(torch.bfloat16), pruned.to(torch.bfloat16)
    before = (W16.clone(), P16.clone(), H.clone())
    out = reconstruct(W16, P16, keep, H, iters=5)
    assert out.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(before, (W16, P16, H)))


def test_rows_already_exact_stay_finite():
    W, X = layer_problem()
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[: ROWS // 2, ::2] = False
    refit = reconstruct(W, W * keep, keep, hessian(X), iters=30)
    assert torch.isfinite(refit).all()
    assert torch.equal(refit[ROWS // 2 :], W[ROWS // 2 :])  # nothing pruned: residual 0 from the start


def planted_hessian(cols=64, outliers=(1000.0, 800.0, 600.0, 400.0), seed=0):
    """H = D^1/2 (I + V diag(outliers) V^T) D^1/2: a few correlated directions far above the rest."""
    g = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(cols, len(outliers), generator=g, dtype=torch.float64)).Q
    C = torch.eye(cols, dtype=torch.float64) + V @ torch.diag(torch.tensor(outliers, dtype=torch.float64)) @ V.T
    d = torch.exp(torch.randn(cols, generator=g, dtype=torch.float64))
    return d.sqrt()[:, None] * C * d.sqrt()[None, :], C


def test_top_eigenpairs_by_subspace_iteration_match_eigh():
    _, C = planted_hessian()
    vals, vecs = _top_eigenpairs(C.float(), 4)
    ref_vals, ref_vecs = torch.linalg.eigh(C)
    assert torch.allclose(vals.double(), ref_vals[-4:], rtol=1e-4)
    assert torch.allclose((vecs.double().T @ ref_vecs[:, -4:]).abs(), torch.eye(4, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("rank", [0, 4])
def test_preconditioner_inverts_each_rows_restricted_approximation(rank):
    """apply(R)_r = M_KK^-1 r_K for K the row's kept inputs, M = D^1/2 (I + U S U^T) D^1/2 from the
    top eigenpairs of D^-1/2 H D^-1/2 (D = diag H, S = lambda - 1), here by a direct float64 solve."""
    H, _ = planted_hessian()
    keep = torch.rand(8, H.shape[0], generator=torch.Generator().manual_seed(1)) > 0.5
    R = torch.randn(keep.shape, generator=torch.Generator().manual_seed(2)) * keep
    out = low_rank_preconditioner(H.float(), keep.float(), rank)(R, torch.empty_like(R))
    root = H.diagonal().sqrt()
    lam, U = torch.linalg.eigh(H / root[:, None] / root[None, :])
    lam, U = lam[len(lam) - rank :], U[:, len(lam) - rank :]
    M = root[:, None] * (torch.eye(len(root), dtype=H.dtype) + U @ torch.diag(lam - 1) @ U.T) * root[None, :]
    expected = torch.zeros_like(R)
    for r in range(keep.shape[0]):
        k = keep[r].nonzero().squeeze(1)
        expected[r, k] = torch.linalg.solve(M[k][:, k], R[r, k].double()).float()
    assert torch.allclose(out, expected, rtol=1e-3, atol=1e-6)
    assert (out[~keep] == 0).all()


@pytest.mark.parametrize("structure", [UNSTRUCTURED, Structure(2, 4)])
def test_low_rank_preconditioner_converges_faster_than_the_diagonal(structure):
    """The problems share a rank-16 part across features (as LLM activations do): capturing it cuts
    the excess error after 3 steps several times over."""
    W, X = layer_problem(seed=3)
    H = hessian(X)
    pruned, keep = solve_all(W, X, 0.5, structure)["sparsegpt"]
    best = recon_error(W, exact_refit(W, keep, H), X)
    excess = {r: recon_error(W, reconstruct(W, pruned, keep, H, iters=3, rank=r), X) - best for r in (0, 16)}
    assert 0 <= excess[16] < excess[0] / 4, excess


def test_bad_arguments():
    W, X = layer_problem()
    H, keep = hessian(X), torch.ones_like(W, dtype=torch.bool)
    with pytest.raises(ValueError, match="must match"):
        reconstruct(W, W[:, :-1], keep, H)
    with pytest.raises(ValueError, match="inputs"):
        reconstruct(W, W, keep, H[:-1, :-1])
    with pytest.raises(ValueError, match="iters"):
        reconstruct(W, W, keep, H, iters=-1)
    with pytest.raises(ValueError, match="damp"):
        reconstruct(W, W, keep, H, damp=0)
    with pytest.raises(ValueError, match="rank"):
        reconstruct(W, W, keep, H, rank=-1)
