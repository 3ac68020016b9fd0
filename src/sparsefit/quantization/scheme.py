"""Symmetric quantization grids for weights (and the dynamic per-token grid of activations).

One quantizer for the whole project. Every grid is symmetric, so 0 is exactly representable and a
pruned weight stays exactly zero through quantization. The grids follow compressed-tensors'
conventions, so a weight written through its compressors dequantizes to the same floats:

- integer: code = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1), s = max|w| / ((2^b - 1) / 2), so the
  largest weight of a group lands half a step beyond the top code and is clipped to it (as in GPTQ);
- float8 (e4m3): code = float8(w / s), s = max|w| / 448.

Scales are per output row ("channel") or per row and group of `group_size` input columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class Grid:
    """How one tensor is quantized: integer or float8 codes, per channel or per group of input columns."""

    kind: Literal["int", "float"] = "int"
    bits: int = 4
    group_size: int | None = None  # None: one scale per output row

    def __post_init__(self) -> None:
        if self.kind == "float" and self.bits != 8:
            raise ValueError(f"float grids are float8 (e4m3) only, got {self.bits} bits")
        if self.kind == "int" and not 2 <= self.bits <= 8:
            raise ValueError(f"integer grids take 2 to 8 bits, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def qmin(self) -> float:
        return -FP8_MAX if self.kind == "float" else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.kind == "float" else 2 ** (self.bits - 1) - 1

    @property
    def half_range(self) -> float:
        """max|w| / scale: the code the largest magnitude maps to."""
        return FP8_MAX if self.kind == "float" else (2**self.bits - 1) / 2

    def scale(self, amax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The scale for groups whose largest magnitude is `amax`, rounded to `dtype` (the dtype it is
        stored in, so the stored scale dequantizes to exactly the weights computed here). An all-zero
        group gets scale 1: its codes are 0 whatever the scale."""
        s = amax.float() / self.half_range
        s = torch.where(s > 0, s, torch.ones_like(s)).to(dtype).float()
        return torch.where(s > 0, s, torch.ones_like(s))  # a scale that underflowed in `dtype`

    def codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """w / scale on the grid, as float32 values (integers, or float8 values)."""
        x = w.float() / scale
        if self.kind == "float":
            return x.clamp(self.qmin, self.qmax).to(torch.float8_e4m3fn).float()
        return x.round().clamp(self.qmin, self.qmax)

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The float32 weights the codes of `w` dequantize to (zeros as +0.0: -0.0 + 0.0 is +0.0)."""
        return self.codes(w, scale) * scale + 0.0


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (out, groups, group columns): a view; channel grids are one group per row."""
    if group_size is None:
        return w.unsqueeze(1)
    if w.shape[1] % group_size:
        raise ValueError(f"{w.shape[1]} input columns are not a multiple of group_size {group_size}")
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size)


def quantize_rtn(
    weight: torch.Tensor, grid: Grid, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (out, in) weight -> (dequantized float32 weight, scale (out, groups))."""
    g = group_view(weight.float(), grid.group_size)
    scale = grid.scale(g.abs().amax(-1), scale_dtype)  # (out, groups)
    return grid.fake_quantize(g, scale.unsqueeze(-1)).reshape(weight.shape), scale


def fake_quantize_per_token(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Dynamic per-token activation quantization (each row of the last dimension has its own scale),
    as the W8A8 schemes run it at inference."""
    scale = grid.scale(x.detach().abs().amax(-1, keepdim=True))
    return grid.fake_quantize(x, scale).to(x.dtype)
