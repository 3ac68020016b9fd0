"""First-order Taylor importance (Molchanov et al., 2019, "Importance Estimation for Neural Network
Pruning"): removing weight W_ij changes the loss by about -G_ij W_ij, so a row's importance is

    sum over calibration batches b of sum_j |W_ij G_ij(b)|,

with G(b) the loss gradient on batch b. The absolute value is taken per batch, before summing, so
gradients of opposite signs on different batches do not cancel.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def taylor_scores(weight: torch.Tensor, grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """Row scores of `weight` (out, in) from the per-batch gradients `grads`, each (out, in)."""
    w = weight.detach().float()
    scores = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    for grad in grads:
        scores += (w * grad.detach().float()).abs().sum(dim=1)
    return scores
