"""How a group's weight scale is chosen from its weights (an "observer", in llm-compressor's terms).

- minmax: the scale that maps the group's largest magnitude to the top of the grid (`Grid.scale`).
- mse: the clip-ratio search of llm-compressor's `mse` observer (after GPTQ's reference code,
  `quant.py: Quantizer.find_params(..., mse=True)`): try the ranges p * max|w| for p = 1, 0.99, ...,
  0.80 and keep, per group, the one whose round trip loses least, sum |w - q(w)|^2.4. (Those stop
  at 0.81 and llm-compressor's ends early after 5 candidates without gain; every candidate is tried here.)
  Clipping a few large weights buys a finer step for all the others; at 4 bits that usually pays.

Candidates are scored with the scale rounded to its storage dtype, so the scale kept is the one
whose codes the export writes. Zero weights (pruned) quantize to exactly 0 at any scale and so
never move the choice.
"""

from __future__ import annotations

from typing import Literal

import torch

from sparsefit.quantization.scheme import Grid

Observer = Literal["minmax", "mse"]

MSE_GRID = 100  # candidate ratios per unit of range (steps of 0.01)
MSE_MAXSHRINK = 0.2  # the smallest range tried is 0.8 x max|w|
MSE_NORM = 2.4  # the error's exponent (GPTQ's and llm-compressor's)


def choose_scale(
    groups: torch.Tensor, grid: Grid, observer: Observer = "mse", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(..., group columns) weights -> (...) scales, one per group, rounded to `dtype`."""
    amax = groups.detach().abs().amax(-1)
    best = grid.scale(amax, dtype)
    if observer == "minmax":
        return best
    if observer != "mse":
        raise ValueError(f"unknown observer {observer!r}: minmax or mse")
    w = groups.detach().float()
    best_err = _error(w, best, grid)
    for i in range(1, int(MSE_MAXSHRINK * MSE_GRID) + 1):
        scale = grid.scale(amax * (1 - i / MSE_GRID), dtype)
        err = _error(w, scale, grid)
        better = err < best_err
        best = torch.where(better, scale, best)
        best_err = torch.where(better, err, best_err)
    return best


def _error(w: torch.Tensor, scale: torch.Tensor, grid: Grid) -> torch.Tensor:
    """sum |q(w) - w|^MSE_NORM over each group (in place on one temporary: the search's cost)."""
    return grid.fake_quantize(w, scale.unsqueeze(-1)).sub_(w).abs_().pow_(MSE_NORM).sum(-1)
