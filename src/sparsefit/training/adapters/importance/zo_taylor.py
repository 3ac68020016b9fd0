"""Zeroth-order Taylor importance: the Taylor criterion with the gradient estimated by SPSA
(Spall, 1992), from forward passes only. For a random direction z over the weights and a small eps,

    g ~ (L(W + eps z) - L(W - eps z)) / (2 eps) * z,

and n directions, each on its own data chunk, are averaged before the row score
sum_j |W_ij g_ij| is taken. Averaging first matters: with a single Rademacher direction |W * g| is
|c| |W|, so the ranking would be exactly the l1 one, whatever the data. With few directions the
estimate is mostly noise (its variance grows with the number of weights); the benchmark measures its
rank correlation with the first-order criterion rather than assume it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def spsa_coefficient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """The directional derivative estimate (L+ - L-) / (2 eps) that scales one direction z."""
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return (loss_plus - loss_minus) / (2.0 * eps)


def zo_taylor_scores(weight: torch.Tensor, directions: Iterable[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """Row scores of `weight` (out, in) from (coefficient, z) pairs, z (out, in) the direction's part
    for this layer: g = mean of coefficient * z, score = sum_j |W_ij g_ij|."""
    w = weight.detach().float()
    estimate = torch.zeros_like(w)
    n = 0
    for coefficient, z in directions:
        estimate.add_(z.float(), alpha=coefficient)
        n += 1
    if n == 0:
        raise ValueError("zo_taylor_scores needs at least one direction")
    return (w * estimate.div_(n)).abs().sum(dim=1)
