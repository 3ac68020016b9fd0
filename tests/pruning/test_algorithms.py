"""The pure pruning functions, checked exactly on small random matrices."""

import pytest
import torch

from sparsefit.pruning.magnitude import prune_magnitude
from sparsefit.pruning.owl import outlier_ratio, owl_sparsities
from sparsefit.pruning.sparsegpt import inverse_hessian, prune_sparsegpt, sparsegpt
from sparsefit.pruning.structure import (
    UNSTRUCTURED,
    Structure,
    check_sparsity,
    float_mask,
    kth_smallest,
    lowest_k,
    nm_keep_mask,
    topk_keep_mask,
)
from sparsefit.pruning.wanda import prune_wanda, wanda_scores

ROWS, COLS = 48, 64


def layer_problem(rows=ROWS, cols=COLS, tokens=512, seed=0, dead=()):
    """A weight and calibration inputs with correlated features of very different norms, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(0.75 * torch.randn(cols, generator=g))  # log-normal feature scales
    scales[torch.randperm(cols, generator=g)[:4]] *= 4  # a few outlier features
    mix = torch.randn(16, cols, generator=g)  # shared low-rank part: where SparseGPT's updates pay off
    X = (torch.randn(tokens, 16, generator=g) @ mix / 4 + 0.5 * torch.randn(tokens, cols, generator=g)) * scales
    X[:, list(dead)] = 0  # inputs that never fire
    W = torch.randn(rows, cols, generator=g)
    return W, X


def hessian(X):
    return 2 * X.T @ X / X.shape[0]


def recon_error(W, W2, X):
    return torch.linalg.norm(X @ W.T - X @ W2.T).item()


def solve_all(W, X, sparsity, structure=UNSTRUCTURED, preserve_mask=None):
    """{method: (weight, mask)} for the three methods on one problem."""
    return {
        "magnitude": prune_magnitude(W, sparsity, structure, preserve_mask=preserve_mask),
        "wanda": prune_wanda(W, (X * X).sum(0), sparsity, structure, preserve_mask),
        "sparsegpt": sparsegpt(W, hessian(X), sparsity, structure, preserve_mask=preserve_mask),
    }


@pytest.mark.parametrize("structure", [Structure(), Structure(2, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_error_ordering(structure, seed):
    W, X = layer_problem(seed=seed)
    err = {k: recon_error(W, w, X) for k, (w, _) in solve_all(W, X, 0.5, structure).items()}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_exact_nm_patterns(n, m):
    W, X = layer_problem(dead=(5,))
    for name, (pruned, mask) in solve_all(W, X, 0.5, Structure(n, m)).items():
        assert (mask.reshape(ROWS, -1, m).sum(-1) == n).all(), name
        assert ((pruned != 0).reshape(ROWS, -1, m).sum(-1) <= n).all(), name
        assert (pruned[~mask] == 0).all(), name


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7])
def test_achieved_sparsity_is_exact(sparsity):
    W, X = layer_problem(dead=(3, 40))
    out = solve_all(W, X, sparsity)
    assert (~out["magnitude"][1]).sum().item() == round(W.numel() * sparsity)
    per_row = round(COLS * sparsity)
    assert ((~prune_magnitude(W, sparsity, scope="row")[1]).sum(1) == per_row).all()
    assert ((~out["wanda"][1]).sum(1) == per_row).all()
    # SparseGPT: exactly round(numel * s) per column block, although the dead columns tie at score 0.
    assert (~out["sparsegpt"][1]).sum().item() == round(W.numel() * sparsity)
    hinv, dead = inverse_hessian(hessian(X))
    _, mask = prune_sparsegpt(W, hinv, dead, sparsity, block_size=16)
    per_block = (~mask).reshape(ROWS, COLS // 16, 16).sum((0, 2))
    assert (per_block == round(ROWS * 16 * sparsity)).all()
    for name, (pruned, mask) in out.items():
        assert (pruned[~mask] == 0).all(), name
        assert ((pruned == 0) | mask).all() and (pruned.count_nonzero() <= mask.sum()), name


def test_dead_columns():
    W, X = layer_problem(dead=(0, 7, 8))
    hinv, dead = inverse_hessian(hessian(X))
    assert dead.tolist() == [j in (0, 7, 8) for j in range(COLS)]
    assert torch.isfinite(hinv).all()
    for structure in (Structure(), Structure(2, 4)):
        pruned, mask = prune_sparsegpt(W, hinv, dead, 0.5, structure)
        assert torch.isfinite(pruned).all()
        assert (pruned[:, dead] == 0).all()  # never influenced the output
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
    assert torch.equal(wanda_scores(W, torch.tensor([4.0, 1.0])), torch.tensor([[2.0, 2.0], [6.0, 0.5]]))
    # Per row: row 0 scores (2, 1) and row 1 (6, 0.25): the second column goes in both.
    _, mask = prune_wanda(W, torch.tensor([4.0, 0.25]), 0.5)
    assert torch.equal(mask, torch.tensor([[True, False], [True, False]]))
    with pytest.raises(ValueError, match="input_sq_sum"):
        wanda_scores(W, torch.ones(3))


@pytest.mark.parametrize("structure", [Structure(), Structure(2, 4)])
@pytest.mark.parametrize("earlier_fraction", [0.3, 0.7])
def test_preserve_mask_never_revives(structure, earlier_fraction):
    W, X = layer_problem()
    earlier = torch.rand(W.shape, generator=torch.Generator().manual_seed(9)) >= earlier_fraction
    W = W * earlier
    for name, (pruned, mask) in solve_all(W, X, 0.5, structure, preserve_mask=earlier).items():
        assert (pruned[~earlier] == 0).all(), name
        assert not (mask & ~earlier).any(), name  # the result is a subset of the preserved mask
        assert (pruned[~mask] == 0).all(), name
        if earlier_fraction > 0.5 and not structure.is_nm:
            assert torch.equal(mask, earlier), name  # already past the target: nothing more, nothing revived


def test_sparsegpt_zero_sparsity_is_identity():
    W, X = layer_problem()
    pruned, mask = sparsegpt(W, hessian(X), 0.0)
    assert mask.all() and torch.allclose(pruned, W, atol=1e-5)


def test_bf16_weights_stay_bf16():
    W, X = layer_problem()
    for name, (pruned, mask) in solve_all(W.bfloat16(), X, 0.5).items():
        assert pruned.dtype == torch.bfloat16 and mask.dtype == torch.bool, name
        assert (pruned[~mask] == 0).all(), name


def test_sparsegpt_leaves_inputs_alone_and_handles_transposed_views():
    W, X = layer_problem()
    H = hessian(X)
    H_before, W_before = H.clone(), W.clone()
    a, _ = sparsegpt(W.t().contiguous().t(), H, 0.5)  # non-contiguous input, as GPT-2 Conv1D gives
    b, _ = sparsegpt(W, H, 0.5)
    assert torch.equal(a, b)
    assert torch.equal(H, H_before) and torch.equal(W, W_before)


def test_sparsegpt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="raise damp"):
        inverse_hessian(-torch.eye(4))
    W, X = layer_problem()
    hinv, dead = inverse_hessian(hessian(X))
    with pytest.raises(ValueError, match="multiple of M=8"):
        prune_sparsegpt(W, hinv, dead, 0.5, Structure(4, 8), block_size=12)
    with pytest.raises(ValueError, match="inverse_hessian"):
        prune_sparsegpt(W[:, :32], hinv, dead, 0.5)


def test_owl_profile():
    ratios = [0.01, 0.05, 0.02, 0.10]
    s = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.7, abs=1e-9)
    assert max(s) - min(s) == pytest.approx(0.16)  # the span is exactly 2 lam
    assert all(0.7 - 2 * 0.08 <= x <= 0.7 + 2 * 0.08 for x in s)
    # more outliers, fewer zeros
    assert sorted(range(4), key=lambda i: s[i]) == sorted(range(4), key=lambda i: -ratios[i])
    # Symmetric ratios land exactly on target +- lam; a lone outlying block goes past lam (reference code).
    assert owl_sparsities([0.0, 0.5, 1.0], 0.5, 0.1) == pytest.approx([0.6, 0.5, 0.4])
    lone = owl_sparsities([0.0, 0.0, 0.0, 1.0], 0.5, 0.1)
    assert lone == pytest.approx([0.55, 0.55, 0.55, 0.35]) and sum(lone) / 4 == pytest.approx(0.5, abs=1e-9)
    assert owl_sparsities([0.2, 0.2], 0.5) == [0.5, 0.5]
    with pytest.raises(ValueError, match="lower owl_lambda"):
        owl_sparsities([0.0, 1.0], 0.95, 0.2)
    with pytest.raises(ValueError, match="lower owl_lambda"):
        owl_sparsities([0.0, 1.0], 0.05, 0.2)


def test_outlier_ratio():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 100.0])]
    # mean = 107 / 8 = 13.375: only 100 is above 5 x mean = 66.9, nothing above 10 x mean
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 10.0) == 0.0
    assert outlier_ratio([torch.ones(2, 3)]) == 0.0


@pytest.mark.parametrize(
    "text, problem",
    [
        ("2-4", "malformed"),
        ("4:2", "smaller than M"),
        ("2:2", "smaller than M"),
        ("0:4", "at least 1"),
        ("a:b", "malformed"),
    ],
)
def test_malformed_structures(text, problem):
    with pytest.raises(ValueError, match=f"structure '{text}' is .*{problem}.*'2:4'"):
        Structure.parse(text)


def test_structure_parse_and_columns():
    assert Structure.parse("2:4") == Structure(2, 4) and str(Structure.parse(" 2 : 4 ")) == "2:4"
    assert Structure.parse(None) == Structure.parse("unstructured") == Structure()
    assert str(Structure()) == "unstructured" and not Structure().is_nm and Structure(4, 8).is_nm
    assert Structure(2, 4).sparsity == 0.5 and Structure(1, 4).sparsity == 0.75
    with pytest.raises(ValueError, match="divisible by 8.*q_proj has 12"):
        Structure(4, 8).check_columns(12, "q_proj")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("structure", [Structure(), Structure(2, 4)])
def test_bad_sparsity(sparsity, structure):
    W, X = layer_problem()
    with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
        check_sparsity(sparsity)
    for call in (
        lambda: prune_magnitude(W, sparsity, structure),
        lambda: prune_wanda(W, (X * X).sum(0), sparsity, structure),
        lambda: sparsegpt(W, hessian(X), sparsity, structure),
    ):
        with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
            call()


def test_nm_that_does_not_divide_columns():
    W, X = layer_problem(cols=10)
    for call in (
        lambda: prune_magnitude(W, 0.5, Structure(2, 4)),
        lambda: prune_wanda(W, (X * X).sum(0), 0.5, Structure(2, 4)),
        lambda: sparsegpt(W, hessian(X), 0.5, Structure(2, 4)),
    ):
        with pytest.raises(ValueError, match="divisible by 4.*has 10"):
            call()


def test_float_mask_matches_the_bool_conversion():
    mask = torch.rand(37, 64) > 0.4
    for m in (mask, mask.t(), mask[:, 3:40]):  # contiguous, transposed, sliced
        f = float_mask(m)
        assert f.dtype == torch.float32 and torch.equal(f, m.to(torch.float32))


def test_mask_helpers_with_ties():
    scores = torch.zeros(4, 8)
    assert (~topk_keep_mask(scores, 0.5)).sum() == 16
    assert ((~topk_keep_mask(scores, 0.25, dim=1)).sum(1) == 2).all()
    assert (nm_keep_mask(scores, 2, 4).reshape(4, 2, 4).sum(-1) == 2).all()
    assert topk_keep_mask(scores, 0.0).all()
    # The highest scores are the ones kept.
    ranked = torch.arange(8.0).repeat(2, 1)
    assert nm_keep_mask(ranked, 1, 4).tolist() == [[False, False, False, True, False, False, False, True]] * 2


def reference_sparsegpt(W, H, sparsity, structure=UNSTRUCTURED, block_size=128, damp=0.01):
    """IST-DASLab's `fasterprune` as written there, in float64: one OBS update per column over the whole block."""
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not structure.is_nm:
            tmp = (W1**2 / d**2).flatten()
            mask1.view(-1)[tmp.argsort()[: round(tmp.numel() * sparsity)]] = True
        for i in range(i2 - i1):
            if structure.is_nm and i % structure.m == 0:
                tmp = W1[:, i : i + structure.m] ** 2 / d[i : i + structure.m] ** 2
                low = torch.topk(tmp, structure.m - structure.n, dim=1, largest=False).indices
                mask1[:, i : i + structure.m].scatter_(1, low, True)
            q = W1[:, i].masked_fill(mask1[:, i], 0)
            err = (W1[:, i] - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Q1[:, i], Err1[:, i] = q, err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        keep[:, i1:i2] = ~mask1
    return W, keep


@pytest.mark.parametrize("structure", [UNSTRUCTURED, Structure(2, 4), Structure(4, 8)])
@pytest.mark.parametrize("block_size", [128, 40])
def test_sparsegpt_matches_the_reference_loop(structure, block_size):
    """The sub-blocked updates and the one-factorization inverse give the reference's masks and weights."""
    if structure.is_nm and block_size % structure.m:
        block_size = 48
    W, X = layer_problem(rows=24, cols=168, tokens=1024, dead=(7,))
    ours, keep = sparsegpt(W, hessian(X), 0.5, structure, block_size)
    ref, ref_keep = reference_sparsegpt(W, hessian(X).double(), 0.5, structure, block_size)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(ours.double(), ref, atol=1e-4, rtol=1e-4)


def test_inverse_hessian_is_the_cholesky_factor_of_the_inverse():
    _, X = layer_problem(cols=300, tokens=2048, dead=(3, 200))
    H = hessian(X)
    U, dead = inverse_hessian(H, damp=0.01)
    assert dead.nonzero().flatten().tolist() == [3, 200]
    assert torch.equal(U, U.triu()) and (U.diagonal() > 0).all()
    Hd = H.double()
    Hd[dead, dead] = 1
    Hd += 0.01 * Hd.diagonal().mean() * torch.eye(300, dtype=torch.float64)
    assert torch.allclose(U.double().T @ U.double() @ Hd, torch.eye(300, dtype=torch.float64), atol=1e-3)


def test_lowest_k_counts_ties_by_index():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    assert lowest_k(scores, 3, dim=1).tolist() == [
        [False, True, True, False, True, False],
        [True, True, True, False, False, False],
    ]
    assert lowest_k(scores.flatten(), 0).sum() == 0
    assert lowest_k(scores.flatten(), 12).all()
    assert lowest_k(torch.tensor([0.0, float("-inf"), 4.0]), 1).tolist() == [False, True, False]


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(128 * 576, generator=torch.Generator().manual_seed(0)).square(),  # a column block's scores
        torch.cat([torch.full((300,), float("-inf")), torch.zeros(40000), torch.rand(30000)]),  # preserved and dead
        torch.where(torch.arange(70000) % 32 == 0, 1e9 + torch.arange(70000.0), 0.0),  # the sample misleads
    ],
)
def test_kth_smallest_is_exact(values):
    n = values.numel()
    for k in (1, 2, 300, 301, n // 3, n // 2, n - 1, n):
        assert kth_smallest(values, k) == values.kthvalue(k).values, k
    k = n // 2
    assert torch.equal(lowest_k(values, k), lowest_k(values.view(1, -1), k, dim=1)[0])  # banded vs plain, ties too


@pytest.mark.parametrize("structure", [UNSTRUCTURED, Structure(2, 4)])
def test_sparsegpt_stacked_layers_match_separate_solves(structure):
    """q/k/v-like layers sharing H, stacked by rows with their own sparsities: each comes out as
    if solved alone (rows never interact; the unstructured count is per layer)."""
    W, X = layer_problem(rows=40, seed=4)
    hinv, dead = inverse_hessian(hessian(X))
    parts, targets = W.split([24, 8, 8]), [0.5, 0.25, 0.75]
    alone = [prune_sparsegpt(w, hinv, dead, s, structure, block_size=16) for w, s in zip(parts, targets)]
    groups = [(w.shape[0], s) for w, s in zip(parts, targets)]
    weight, keep = prune_sparsegpt(W, hinv, dead, 0.0, structure, block_size=16, row_groups=groups)
    assert torch.allclose(weight, torch.cat([w for w, _ in alone]), atol=1e-5)
    assert torch.equal(keep, torch.cat([k for _, k in alone]))
    with pytest.raises(ValueError, match="add up"):
        prune_sparsegpt(W, hinv, dead, 0.5, structure, row_groups=[(24, 0.5)])
