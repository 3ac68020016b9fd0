"""SR-STE: sparse-refined straight-through gradients (Zhou et al., ICLR 2021, "Learning N:M
Fine-grained Structured Sparse Neural Networks From Scratch"), as used by the Adaptive Sparse
Trainer (Huang et al., AAAI 2025).

The forward uses W * M; the straight-through estimator hands the gradient of W * M to every dense
weight, and SR-STE adds a decay on the pruned ones only:

    g <- g + lambda(t) * (1 - M) * W

so weights that stay pruned drift towards zero and the mask stops oscillating between them and
their kept neighbours. lambda rises linearly from 0 to its peak over `ramp_steps`, then stays flat.
(AST's released code applies `~` to an int32 mask, giving -1 / -2 instead of 1 / 0: its decay has
the wrong sign and also hits kept weights. Here the mask is boolean and `~keep` is exactly 1 - M.)
"""

from __future__ import annotations

import torch


def srste_lambda(step: int, peak: float, ramp_steps: int) -> float:
    """The decay strength at optimizer step `step` (0-based): peak * min(1, step / ramp_steps)."""
    if ramp_steps <= 0:
        return peak
    return peak * min(1.0, step / ramp_steps)


@torch.no_grad()
def add_srste_decay_(
    grad: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, lam: float, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """grad += lam * (1 - keep) * weight, in place: kept weights get nothing (an exact +-0 is added),
    pruned ones a pull towards 0. `scratch` (weight's shape and dtype) saves an allocation."""
    if lam:
        grad.add_(torch.mul(weight, ~keep, out=scratch) if scratch is not None else weight * ~keep, alpha=lam)
    return grad
