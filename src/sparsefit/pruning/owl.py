"""OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"): blocks with more outliers keep more weights."""

from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of entries of one block's Wanda scores above `m` times their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return (flat > m * flat.mean()).float().mean().item()


def owl_sparsities(ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsities: ratios min-max scaled to [0, 2 lam], centred on density 1 - target.

    As in the reference code: density = scaled - mean(scaled) + (1 - target), so the mean
    sparsity equals `target` and the blocks spread over exactly 2 lam.
    """
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [target] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    result = [1.0 - (s - mean + 1.0 - target) for s in scaled]
    if min(result) < 0.0 or max(result) >= 1.0:
        raise ValueError(
            f"OWL with target {target} and lambda {lam} gives block sparsities outside [0, 1); lower owl_lambda"
        )
    return result
