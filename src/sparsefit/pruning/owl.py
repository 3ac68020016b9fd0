"""OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity (OWL)"): blocks with more outliers keep more weights.

The outlier ratio of a decoder block is the fraction of its Wanda scores above M times their
mean (the paper's "layerwise outlier distribution", M = 5 by default); the per-block sparsities
follow the reference code (`lib/prune_all.py`, `prune_wanda_outlier`).
"""

from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of all entries of one block's Wanda scores (all its linears together) above `m` times their mean."""
    if not scores or not any(s.numel() for s in scores):
        raise ValueError("outlier_ratio needs at least one non-empty score tensor")
    # Sums instead of torch.cat: no second copy of a whole block's scores.
    count = sum(s.numel() for s in scores)
    threshold = m * sum(float(s.detach().sum(dtype=torch.float64)) for s in scores) / count
    return sum(int((s.detach() > threshold).sum()) for s in scores) / count


def owl_sparsities(ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsities: ratios min-max scaled to [0, 2 lam], centred on density 1 - target.

    As in the reference code: density = scaled - mean(scaled) + (1 - target), sparsity = 1 - density,
    so the mean sparsity equals `target`, the most outlier-rich block is pruned least, and the
    sparsities span exactly 2 lam. They lie within target +- lam only when the scaled ratios are
    symmetric about their mean; a single outlying block can sit up to 2 lam from the target.
    """
    if not ratios:
        raise ValueError("owl_sparsities needs one outlier ratio per block, got none")
    if lam < 0:
        raise ValueError(f"OWL lambda {lam} is negative; use a small spread such as 0.08")
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [target] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    result = [target - (s - mean) for s in scaled]  # = 1 - (s - mean + 1 - target), without the rounding
    if min(result) < 0.0 or max(result) >= 1.0:
        raise ValueError(
            f"OWL with target {target} and lambda {lam} gives block sparsities from {min(result):.3f} to "
            f"{max(result):.3f}, outside [0, 1); lower owl_lambda"
        )
    return result
