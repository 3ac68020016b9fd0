"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

score_ij = |W_ij| * ||X_j||_2, where ||X_j|| is the norm of input feature j over every calibration
token (Eq. 1). Unstructured pruning compares weights within each output row (Sec. 3, "per output"),
so every row loses the same count; N:M keeps the N best scores of every M consecutive inputs.
"""

from __future__ import annotations

import torch

from sparsefit.pruning.structure import UNSTRUCTURED, Structure, keep_mask


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||: weight (out, in), input_sq_sum (in,) = sum over tokens of x_j^2 -> float32 (out, in)."""
    if input_sq_sum.shape != weight.shape[1:]:
        raise ValueError(
            f"input_sq_sum has shape {tuple(input_sq_sum.shape)} but the weight has {weight.shape[1]} inputs; "
            "pass the per-input sum of squares captured at this layer's input"
        )
    return weight.detach().abs().float() * input_sq_sum.detach().float().sqrt().unsqueeze(0)


def prune_wanda(
    weight: torch.Tensor,
    input_sq_sum: torch.Tensor,
    sparsity: float,
    structure: Structure = UNSTRUCTURED,
    preserve_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> (pruned weight in weight's dtype, keep mask); the same count pruned in every row."""
    mask = keep_mask(wanda_scores(weight, input_sq_sum), sparsity, structure, 1, preserve_mask)
    return weight.detach().masked_fill(~mask, 0), mask
