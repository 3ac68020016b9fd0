"""Magnitude criteria: the l1 or l2 norm of each output row of W (out, in)."""

from __future__ import annotations

import torch


def l1_scores(weight: torch.Tensor) -> torch.Tensor:
    """sum_j |W_ij| per row i."""
    return weight.detach().float().abs().sum(dim=1)


def l2_scores(weight: torch.Tensor) -> torch.Tensor:
    """sqrt(sum_j W_ij^2) per row i."""
    return torch.linalg.vector_norm(weight.detach().float(), dim=1)
