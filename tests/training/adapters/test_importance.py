"""Row-importance criteria: each ranks a planted important row first; SPSA's estimate is exact for a
linear loss; random scores are reproducible."""

import pytest
import torch
from torch import nn

from sparsefit.training.adapters.importance import (
    l1_scores,
    l2_scores,
    random_scores,
    spsa_coefficient,
    taylor_scores,
    zo_taylor_scores,
)
from sparsefit.training.adapters.select import choose_rows, row_scores

PLANTED = 3


def planted_layer():
    """A linear whose row 3 alone is wrong for the data: only that row has a loss gradient, while its
    weights are no larger than any other row's."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(0, 2, (8, 16)).float() * 2 - 1)
    x = torch.randn(32, 16)
    target = layer(x).detach()
    target[:, PLANTED] += 3.0

    def loss_fn(batch):
        return ((layer(batch["x"]) - batch["y"]) ** 2).mean()

    batches = [{"x": x[i : i + 8], "y": target[i : i + 8]} for i in range(0, 32, 8)]
    return layer, loss_fn, batches


@pytest.mark.parametrize("fn", [l1_scores, l2_scores])
def test_norms_rank_the_largest_row_first(fn):
    w = torch.randn(8, 16)
    w[PLANTED] *= 10
    scores = fn(w)
    assert scores.shape == (8,) and int(scores.argmax()) == PLANTED
    expected = w.abs().sum(1) if fn is l1_scores else w.pow(2).sum(1).sqrt()
    assert torch.allclose(scores, expected)


def test_taylor_sums_abs_products_per_batch():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    g1, g2 = torch.tensor([[1.0, 1.0], [0.0, 2.0]]), torch.tensor([[-1.0, 0.0], [1.0, -2.0]])
    # per batch |W * G| before summing: opposite signs across batches do not cancel
    assert torch.equal(taylor_scores(w, [g1, g2]), torch.tensor([3.0 + 1.0, 1.0 + 3.0 + 1.0]))


def test_spsa_is_exact_for_a_linear_loss():
    a, w, z = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    eps = 1e-3

    def loss(v):
        return float((v.double() * a.double()).sum())

    c = spsa_coefficient(loss(w + eps * z), loss(w - eps * z), eps)
    assert c == pytest.approx(float((a * z).sum()), rel=1e-4)
    with pytest.raises(ValueError, match="positive"):
        spsa_coefficient(1.0, 0.0, 0.0)


def test_zo_scores_average_directions_before_the_abs():
    w = torch.ones(2, 2)
    z = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    # c and -c on the same direction cancel: the estimate is 0, not 2|c||z|
    assert torch.equal(zo_taylor_scores(w, [(2.0, z), (-2.0, z)]), torch.zeros(2))
    assert torch.equal(zo_taylor_scores(w, [(2.0, z)]), torch.tensor([4.0, 4.0]))
    with pytest.raises(ValueError, match="at least one"):
        zo_taylor_scores(w, [])


@pytest.mark.parametrize("criterion", ["taylor", "zo-taylor"])
def test_data_criteria_rank_the_planted_row_first(criterion):
    layer, loss_fn, batches = planted_layer()
    before = layer.weight.detach().clone()
    scores = row_scores({"l": layer}, criterion, loss_fn, batches, seed=0, directions=256)
    assert int(scores["l"].argmax()) == PLANTED
    assert torch.equal(layer.weight, before)  # zo-taylor restores the perturbed weights exactly
    assert not layer.weight.requires_grad or layer.weight.grad is None
    magnitude = row_scores({"l": layer}, "l1")["l"]
    assert torch.all(magnitude == magnitude[0])  # so magnitude alone could not find it


def test_taylor_scores_each_batch_as_backward_makes_its_gradient():
    """Scored inside backward (each gradient freed at once), taylor equals sum over batches of
    |W * dL/dW| from explicit gradients; earlier gradients and requires_grad are left as they were."""
    torch.manual_seed(0)
    a, b = nn.Linear(6, 5), nn.Linear(5, 3)
    a.weight.requires_grad_(False)
    b.weight.grad = marker = torch.ones_like(b.weight)

    def loss_fn(batch):
        return b(torch.tanh(a(batch["x"]))).square().mean()

    batches = [{"x": torch.randn(4, 6)} for _ in range(3)]
    expected = {"a": torch.zeros(5), "b": torch.zeros(3)}
    a.weight.requires_grad_(True)
    for batch in batches:
        ga, gb = torch.autograd.grad(loss_fn(batch), [a.weight, b.weight])
        expected["a"] += (a.weight * ga).abs().sum(1).detach()
        expected["b"] += (b.weight * gb).abs().sum(1).detach()
    a.weight.requires_grad_(False)
    scores = row_scores({"a": a, "b": b}, "taylor", loss_fn, batches)
    for name in expected:
        assert torch.allclose(scores[name], expected[name], rtol=1e-6, atol=0)
    assert not a.weight.requires_grad and a.weight.grad is None
    assert b.weight.requires_grad and b.weight.grad is marker


def test_random_is_reproducible_and_needs_no_data():
    layer = nn.Linear(4, 10)
    a = row_scores({"l": layer}, "random", seed=1)["l"]
    assert torch.equal(a, row_scores({"l": layer}, "random", seed=1)["l"])
    assert not torch.equal(a, row_scores({"l": layer}, "random", seed=2)["l"])
    assert torch.equal(random_scores(10, torch.Generator().manual_seed(1)), a)
    with pytest.raises(ValueError, match="needs a loss"):
        row_scores({"l": layer}, "taylor")


def test_choose_rows_per_layer_fraction_and_global():
    scores = {"a": torch.tensor([0.1, 5.0, 0.2, 3.0]), "b": torch.tensor([1.0, 1.0, 1.0, 9.0, 1.0, 1.0])}
    assert {k: v.tolist() for k, v in choose_rows(scores, rank=2).items()} == {"a": [1, 3], "b": [0, 3]}
    assert {k: v.tolist() for k, v in choose_rows(scores, fraction=0.5).items()} == {"a": [1, 3], "b": [0, 1, 3]}
    # global: 4 rows where score / layer mean is highest (b: 9/2.33, a: 5/2.08, 3/2.08, then a tie in b)
    chosen = choose_rows(scores, rank=2, budget="global")
    assert sum(len(v) for v in chosen.values()) == 4 and chosen["a"].tolist() == [1, 3] and 3 in chosen["b"].tolist()
    with pytest.raises(ValueError, match="exactly one"):
        choose_rows(scores)
