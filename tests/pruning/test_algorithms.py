"""The pure pruning functions, checked exactly on small random matrices."""

import pytest
import torch

from sparsefit.pruning.magnitude import prune_magnitude
from sparsefit.pruning.owl import outlier_ratio, owl_sparsities
from sparsefit.pruning.sparsegpt import inverse_hessian, prune_sparsegpt, sparsegpt
from sparsefit.pruning.structure import Structure, nm_keep_mask, topk_keep_mask
from sparsefit.pruning.wanda import prune_wanda, wanda_scores


def layer_problem(rows=48, cols=64, tokens=512, seed=0):
    """A weight and calibration inputs whose feature norms differ a lot (as LLM activations do)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(cols, generator=g))  # log-normal feature scales
    X = torch.randn(tokens, cols, generator=g) * scales
    X = X + 0.5 * X[:, :1]  # correlated features: where SparseGPT's updates pay off
    W = torch.randn(rows, cols, generator=g)
    return W, X


def recon_error(W, W2, X):
    return torch.linalg.norm(X @ W.T - X @ W2.T).item()


def solve_all(W, X, sparsity, structure):
    H = 2 * X.T @ X / X.shape[0]
    sq = (X * X).sum(0)
    return {
        "magnitude": prune_magnitude(W, sparsity, structure)[0],
        "wanda": prune_wanda(W, sq, sparsity, structure)[0],
        "sparsegpt": sparsegpt(W, H, sparsity, structure)[0],
    }


@pytest.mark.parametrize("structure", [Structure(), Structure(2, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_error_ordering(structure, seed):
    W, X = layer_problem(seed=seed)
    out = solve_all(W, X, 0.5, structure)
    err = {k: recon_error(W, v, X) for k, v in out.items()}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_exact_nm_patterns(n, m):
    W, X = layer_problem()
    for name, pruned in solve_all(W, X, 0.0, Structure(n, m)).items():
        nonzero = (pruned != 0).reshape(W.shape[0], -1, m).sum(-1)
        assert (nonzero == n).all(), name


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7])
def test_achieved_sparsity_is_exact(sparsity):
    W, X = layer_problem()
    X[:, 3] = 0  # a dead input
    out = solve_all(W, X, sparsity, Structure())
    total = W.numel()
    assert (out["magnitude"] == 0).sum().item() == round(total * sparsity)
    per_row = (out["wanda"] == 0).sum(1)
    assert (per_row == round(W.shape[1] * sparsity)).all()
    # SparseGPT: exact per 128-column block (one block here), plus the zeroed dead column's kept weights
    hinv, dead = inverse_hessian(2 * X.T @ X / X.shape[0])
    pruned, mask = prune_sparsegpt(W, hinv, dead, sparsity)
    assert (~mask).sum().item() == round(total * sparsity)
    assert torch.isfinite(pruned).all() and (pruned[:, 3] == 0).all()
    assert (pruned[~mask] == 0).all()


def test_magnitude_row_scope():
    W, _ = layer_problem()
    pruned, mask = prune_magnitude(W, 0.25, scope="row")
    assert ((~mask).sum(1) == 16).all()
    kept_min = torch.where(mask, W.abs(), torch.inf).min(1).values
    dropped_max = torch.where(~mask, W.abs(), -torch.inf).max(1).values
    assert (dropped_max <= kept_min).all()
    with pytest.raises(ValueError, match="scope"):
        prune_magnitude(W, 0.5, scope="column")


def test_wanda_score_definition():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    sq = torch.tensor([4.0, 1.0])
    assert torch.equal(wanda_scores(W, sq), torch.tensor([[2.0, 2.0], [6.0, 0.5]]))
    pruned, mask = prune_wanda(W, torch.tensor([4.0, 0.25]), 0.5)
    assert torch.equal(mask, torch.tensor([[True, False], [True, False]]))


@pytest.mark.parametrize("structure", [Structure(), Structure(2, 4)])
def test_preserve_mask_never_revives(structure):
    W, X = layer_problem()
    earlier = torch.rand(W.shape, generator=torch.Generator().manual_seed(9)) > 0.3  # 30% already pruned
    W = W * earlier
    H = 2 * X.T @ X / X.shape[0]
    results = {
        "magnitude": prune_magnitude(W, 0.5, structure, preserve_mask=earlier),
        "wanda": prune_wanda(W, (X * X).sum(0), 0.5, structure, preserve_mask=earlier),
        "sparsegpt": sparsegpt(W, H, 0.5, structure, preserve_mask=earlier),
    }
    for name, (pruned, mask) in results.items():
        assert (pruned[~earlier] == 0).all(), name
        assert not (mask & ~earlier).any(), name


def test_sparsegpt_zero_sparsity_is_identity():
    W, X = layer_problem()
    pruned, mask = sparsegpt(W, 2 * X.T @ X / X.shape[0], 0.0)
    assert mask.all() and torch.allclose(pruned, W, atol=1e-5)


def test_sparsegpt_keeps_dtype_and_handles_transposed_views():
    W, X = layer_problem()
    H = 2 * X.T @ X / X.shape[0]
    pruned, _ = sparsegpt(W.bfloat16(), H, 0.5)
    assert pruned.dtype == torch.bfloat16
    a, _ = sparsegpt(W.t().contiguous().t(), H, 0.5)  # non-contiguous input, as GPT-2 Conv1D gives
    b, _ = sparsegpt(W, H, 0.5)
    assert torch.equal(a, b)


def test_sparsegpt_rejects_singular_hessian():
    with pytest.raises(ValueError, match="raise damp"):
        inverse_hessian(-torch.eye(4))


def test_owl_profile():
    ratios = [0.01, 0.05, 0.02, 0.10]
    s = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.7, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s.index(min(s)) == ratios.index(max(ratios))  # most outliers -> least pruned
    assert sorted(range(4), key=lambda i: s[i]) == sorted(range(4), key=lambda i: -ratios[i])
    assert owl_sparsities([0.2, 0.2], 0.5) == [0.5, 0.5]
    with pytest.raises(ValueError, match="lower owl_lambda"):
        owl_sparsities([0.0, 1.0], 0.95, 0.2)


def test_outlier_ratio():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 100.0])]
    # mean = 107/8 = 13.375; only 100 exceeds 5 x mean? 66.9 -> yes
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 10.0) == 0.0


@pytest.mark.parametrize("text", ["2-4", "4:2", "0:4", "a:b", "2:2"])
def test_malformed_structures(text):
    with pytest.raises(ValueError, match=f"structure '{text}'"):
        Structure.parse(text)


def test_structure_parse_and_columns():
    assert Structure.parse("2:4") == Structure(2, 4) and str(Structure.parse(" 2 : 4 ")) == "2:4"
    assert Structure.parse(None) == Structure.parse("unstructured") == Structure()
    assert Structure(2, 4).sparsity == 0.5
    with pytest.raises(ValueError, match="divisible by 8.*q_proj has 12"):
        Structure(4, 8).check_columns(12, "q_proj")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_bad_sparsity(sparsity):
    W, X = layer_problem()
    for call in (
        lambda: prune_magnitude(W, sparsity),
        lambda: prune_wanda(W, (X * X).sum(0), sparsity),
        lambda: sparsegpt(W, 2 * X.T @ X / X.shape[0], sparsity),
    ):
        with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
            call()


def test_nm_that_does_not_divide_columns():
    W = torch.randn(4, 10)
    with pytest.raises(ValueError, match="divisible by 4"):
        prune_magnitude(W, 0.0, Structure(2, 4))


def test_mask_helpers_with_ties():
    scores = torch.zeros(4, 8)
    assert (~topk_keep_mask(scores, 0.5)).sum() == 16
    assert ((~topk_keep_mask(scores, 0.25, dim=1)).sum(1) == 2).all()
    assert (nm_keep_mask(scores, 2, 4).reshape(4, 2, 4).sum(-1) == 2).all()
