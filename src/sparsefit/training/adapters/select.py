"""Which output rows of each linear get a row delta: run a criterion (`importance/`) on the model,
then keep the top rows per layer or under one global budget.

The data-driven criteria use the model's task loss (cross-entropy on the supervised tokens) on a few
micro-batches of the training data, in evaluation mode (no dropout). `taylor` needs one backward
pass per batch (each weight's gradient is scored, then freed, as backward makes it); `zo-taylor`
needs two forward passes per direction and one copy of the targeted weights (to restore them exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsefit.models.layout import weight_as_out_in
from sparsefit.training.adapters.importance import (
    l1_scores,
    l2_scores,
    random_scores,
    spsa_coefficient,
    taylor_scores,
    zo_taylor_scores,
)

Criterion = Literal["l2", "l1", "random", "taylor", "zo-taylor"]
LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def row_scores(
    linears: dict[str, nn.Module],
    criterion: Criterion,
    loss_fn: LossFn | None = None,
    batches: Iterable[dict[str, torch.Tensor]] = (),
    seed: int = 0,
    directions: int = 8,
    eps: float = 1e-3,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One importance score per output row of every linear (higher: more important).

    `reduce` sums a tensor over processes (data-parallel training: each holds other batches), so that
    every process scores, and then chooses, the same rows.
    """
    if criterion == "l2":
        return {name: l2_scores(weight_as_out_in(m)) for name, m in linears.items()}
    if criterion == "l1":
        return {name: l1_scores(weight_as_out_in(m)) for name, m in linears.items()}
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return {name: random_scores(weight_as_out_in(m).shape[0], generator) for name, m in linears.items()}
    if loss_fn is None:
        raise ValueError(f"criterion {criterion} needs a loss and batches")
    batches = list(batches)
    if not batches:
        raise ValueError(f"criterion {criterion} needs at least one batch")
    if criterion == "taylor":
        scores = _taylor(linears, loss_fn, batches)
        if reduce is not None:
            flat = reduce(torch.cat(list(scores.values())))
            scores = dict(zip(scores, flat.split([len(s) for s in scores.values()])))
        return scores
    if criterion == "zo-taylor":
        return _zo_taylor(linears, loss_fn, batches, seed, directions, eps, reduce)
    raise ValueError(f"unknown criterion '{criterion}'")


def _taylor(linears: dict[str, nn.Module], loss_fn: LossFn, batches: list) -> dict[str, torch.Tensor]:
    """Each weight's gradient is scored as soon as backward has made it, then dropped: the peak holds
    the activations and a few gradients, never a gradient for every targeted weight at once."""
    scores = {name: torch.zeros(weight_as_out_in(m).shape[0]) for name, m in linears.items()}

    def score(name: str, module: nn.Module) -> Callable[[torch.Tensor], None]:
        def hook(weight: torch.Tensor) -> None:
            grad = weight.grad.t() if isinstance(module, Conv1D) else weight.grad  # GPT-2 stores (in, out)
            scores[name] += taylor_scores(weight_as_out_in(module), [grad]).cpu()
            weight.grad = None

        return hook

    weights = [m.weight for m in linears.values()]
    saved = [(w.requires_grad, w.grad) for w in weights]
    handles = []
    try:
        for (name, module), w in zip(linears.items(), weights):
            w.requires_grad_(True)
            w.grad = None
            handles.append(w.register_post_accumulate_grad_hook(score(name, module)))
        for batch in batches:  # a linear the loss does not reach on a batch gets no hook call: adds 0
            torch.autograd.backward(loss_fn(batch), inputs=weights)
    finally:
        for handle in handles:
            handle.remove()
        for w, (flag, grad) in zip(weights, saved):
            w.requires_grad_(flag)
            w.grad = grad
    return scores


@torch.no_grad()
def _zo_taylor(
    linears: dict[str, nn.Module],
    loss_fn: LossFn,
    batches: list,
    seed: int,
    directions: int,
    eps: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """SPSA with Gaussian directions, each on its own batch (both signs on the same one); every
    direction is regenerated from its seed per layer instead of being stored."""
    if directions < 1:
        raise ValueError(f"zo-taylor needs at least one direction, got {directions}")
    originals = {name: weight_as_out_in(m).clone() for name, m in linears.items()}

    def direction(k: int, index: int, like: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + k * 10_007 + index)
        return torch.randn(like.shape, generator=generator).to(like)

    def perturb(k: int, scale: float) -> None:
        for index, (name, module) in enumerate(linears.items()):
            weight = weight_as_out_in(module)
            weight.copy_(originals[name]).add_(direction(k, index, weight), alpha=scale)

    coefficients = []
    try:
        for k in range(directions):
            batch = batches[k % len(batches)]
            perturb(k, eps)
            plus = float(loss_fn(batch))
            perturb(k, -eps)
            minus = float(loss_fn(batch))
            coefficients.append(spsa_coefficient(plus, minus, eps))
    finally:
        for name, module in linears.items():
            weight_as_out_in(module).copy_(originals[name])
    if reduce is not None:  # the same directions on every process, each on its own batches: sum the estimates
        coefficients = reduce(torch.tensor(coefficients, dtype=torch.float64)).tolist()
    scores = {}
    for index, name in enumerate(linears):
        weight = originals[name]
        pairs = ((c, direction(k, index, weight)) for k, c in enumerate(coefficients))
        scores[name] = zo_taylor_scores(weight, pairs).cpu()
    return scores


def choose_rows(
    scores: dict[str, torch.Tensor],
    rank: int | None = None,
    fraction: float | None = None,
    budget: Literal["layer", "global"] = "layer",
) -> dict[str, torch.Tensor]:
    """The chosen rows of each layer (sorted indices): the top `rank` rows of each layer, or the top
    `fraction` of its rows; with `budget` "global", the same total number of rows taken where the
    scores, each divided by its layer's mean, are highest (a layer may get none)."""
    if (rank is None) == (fraction is None):
        raise ValueError("give exactly one of rank and fraction")
    counts = {
        name: min(len(s), rank) if rank is not None else max(1, round(fraction * len(s))) for name, s in scores.items()
    }
    if budget == "layer":
        return {name: _top(s, counts[name]) for name, s in scores.items()}
    names = list(scores)
    normalized = torch.cat(
        [s.float() / s.float().mean().clamp_min(torch.finfo(torch.float32).tiny) for s in scores.values()]
    )
    owner = torch.cat([torch.full((len(scores[n]),), i) for i, n in enumerate(names)])
    offsets = torch.tensor([0] + [len(scores[n]) for n in names]).cumsum(0)
    top = torch.topk(normalized, sum(counts.values())).indices
    chosen = {}
    for i, name in enumerate(names):
        picked = top[owner[top] == i] - offsets[i]
        if len(picked):
            chosen[name] = picked.sort().values
    return chosen


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    # stable: ties go to the lower row, so a choice is reproducible
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:count].sort().values
