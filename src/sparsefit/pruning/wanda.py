"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs").

score_ij = |W_ij| * ||X_j||_2, where ||X_j|| is the norm of input feature j over every
calibration token; weights are compared within each output row (Eq. 1 and Sec. 3 of the paper).
"""

from __future__ import annotations

import torch

from sparsefit.pruning.structure import UNSTRUCTURED, Structure, keep_mask


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||: weight (out, in), input_sq_sum (in,) = sum over tokens of x_j^2."""
    return weight.abs().float() * input_sq_sum.float().sqrt().unsqueeze(0)


def prune_wanda(
    weight: torch.Tensor,
    input_sq_sum: torch.Tensor,
    sparsity: float,
    structure: Structure = UNSTRUCTURED,
    preserve_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> (pruned weight, keep mask); the same count pruned in every row."""
    mask = keep_mask(wanda_scores(weight, input_sq_sum), sparsity, structure, 1, preserve_mask)
    return weight * mask, mask
