"""Magnitude pruning: drop the weights of smallest |W|, over the whole layer or per output row."""

from __future__ import annotations

import torch

from sparsefit.pruning.structure import UNSTRUCTURED, Structure, keep_mask


def prune_magnitude(
    weight: torch.Tensor,
    sparsity: float,
    structure: Structure = UNSTRUCTURED,
    scope: str = "layer",
    preserve_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> (pruned weight in weight's dtype, keep mask).

    `scope`: "layer" prunes round(numel * sparsity) weights against one ranking, "row" the same
    count in every output row. N:M ignores the scope (its groups are within rows anyway).
    """
    if scope not in ("layer", "row"):
        raise ValueError(f"magnitude scope '{scope}' is unknown; use 'layer' or 'row'")
    mask = keep_mask(weight.detach().abs().float(), sparsity, structure, None if scope == "layer" else 1, preserve_mask)
    return weight.detach().masked_fill(~mask, 0), mask
