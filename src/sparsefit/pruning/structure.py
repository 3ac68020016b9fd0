"""Sparsity structures (unstructured, or N:M = keep N nonzeros in every M consecutive inputs) and keep masks.

Every mask here is a bool "keep" mask: True = the weight stays, False = it is pruned. Selections
are by count (`lowest_k`), never `score <= threshold` alone, so ties (e.g. all-zero dead columns)
can not prune more than the requested count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Structure:
    """`m == 0` means unstructured; otherwise keep `n` of every `m` consecutive weights of a row (2:4 = 50%)."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str | None) -> Structure:
        """None, "", "unstructured" -> unstructured; "N:M" with 1 <= N < M -> N:M."""
        if text is None or text.strip().lower() in ("", "unstructured"):
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"structure '{text}' is malformed: use 'unstructured' or 'N:M' with integers, e.g. '2:4'")
        n, m = int(match[1]), int(match[2])
        if n < 1:
            raise ValueError(f"structure '{text}' is invalid: N must be at least 1 (N weights are kept), e.g. '2:4'")
        if n >= m:
            raise ValueError(f"structure '{text}' is invalid: N must be smaller than M, e.g. '2:4'")
        return cls(n, m)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        """Fraction of zeros an N:M pattern implies (0 for unstructured, whose sparsity is chosen freely)."""
        return 1.0 - self.n / self.m if self.is_nm else 0.0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def check_columns(self, in_features: int, name: str = "layer") -> None:
        """N:M groups run along the input dimension, so M must divide it."""
        if self.is_nm and in_features % self.m:
            raise ValueError(
                f"{self} sparsity needs input features divisible by {self.m}, but {name} has {in_features}; "
                f"pick an M that divides {in_features} or ignore this layer"
            )

    def holds(self, weight: torch.Tensor) -> bool:
        """Whether `weight` (out, in) has at most N nonzeros in every group of M inputs (always, unstructured)."""
        if not self.is_nm:
            return True
        if weight.shape[-1] % self.m:
            return False
        return bool(((weight.reshape(weight.shape[0], -1, self.m) != 0).sum(-1) <= self.n).all())


UNSTRUCTURED = Structure()


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1); pass a fraction of zeros such as 0.5")


def lowest_k(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Bool mask of exactly the `k` lowest scores along `dim`; ties at the k-th value go to the lower index.

    kthvalue plus a tie count instead of topk: for k near half of a large slice (SparseGPT's whole
    column block) this is several times faster, with the same selection wherever scores are distinct.
    """
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.dim() == 1 and scores.numel() >= _BAND_MIN:
        kth = kth_smallest(scores, k).reshape(1)
    else:
        kth = scores.kthvalue(k, dim=dim, keepdim=True).values
    below, ties = scores < kth, scores == kth
    need = k - below.sum(dim, keepdim=True)
    return below | (ties & (ties.cumsum(dim) <= need))


_BAND_MIN = 1 << 15  # below this, one kthvalue is already fast
_SAMPLE_STRIDE = 32


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of a 1-D tensor, exactly, as a 0-d tensor.

    Floyd-Rivest style: a strided sample brackets the k-th value, and `kthvalue` runs only on the
    few percent of values inside the bracket, which for a whole SparseGPT column block beats one
    `kthvalue` over all of it. Falls back to that when the bracket misses (the result is exact
    either way).
    """
    n = values.numel()
    sample = values[::_SAMPLE_STRIDE]
    m = sample.numel()
    at, margin = k * m / n, 4.0 * m**0.5 + 1  # the k-th value's rank in the sample, +- ~4 sd
    lo_rank, hi_rank = int(at - margin), int(at + margin) + 1
    lo = sample.kthvalue(lo_rank).values if lo_rank >= 1 else None
    hi = sample.kthvalue(hi_rank).values if hi_rank <= m else None
    inside = torch.ones_like(values, dtype=torch.bool)
    below = 0
    if lo is not None:  # NaN is neither below nor inside a bounded band: kthvalue ranks it last
        under = values < lo
        below, inside = int(under.sum()), ~under
    if hi is not None:
        inside &= values <= hi
    band = values[inside]
    if below < k <= below + band.numel():
        return band.kthvalue(k - below).values
    return values.kthvalue(k).values


def topk_keep_mask(scores: torch.Tensor, sparsity: float, dim: int | None = None) -> torch.Tensor:
    """Keep mask pruning exactly round(count * sparsity) lowest scores, whole tensor (dim=None) or along `dim`.

    With dim=1 every row loses the same count, round(cols * sparsity).
    """
    check_sparsity(sparsity)
    if dim is None:
        return ~lowest_k(scores.flatten(), round(scores.numel() * sparsity)).view_as(scores)
    return ~lowest_k(scores, round(scores.shape[dim] * sparsity), dim)


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the `n` highest scores of every `m` consecutive columns of each row of `scores` (rows, cols)."""
    if scores.dim() != 2:
        raise ValueError(f"N:M masks need a 2-D (out, in) score matrix, got shape {tuple(scores.shape)}")
    Structure.parse(f"{n}:{m}")  # validates 1 <= n < m with the usual message
    rows, cols = scores.shape
    Structure(n, m).check_columns(cols, "the score matrix")  # callers check first, naming the layer
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return mask.reshape(rows, cols)


def float_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as float32 0/1, converted from its bytes: on CPUs several times faster than from bool."""
    return mask.contiguous().view(torch.uint8).to(torch.float32)


def preserved(scores: torch.Tensor, preserve_mask: torch.Tensor | None) -> torch.Tensor:
    """Scores where earlier-pruned weights (preserve_mask False) rank below everything, so they are pruned first."""
    if preserve_mask is None:
        return scores
    if preserve_mask.shape != scores.shape:
        raise ValueError(
            f"preserve_mask has shape {tuple(preserve_mask.shape)} but the weight has {tuple(scores.shape)}; "
            "pass the keep mask of this same layer"
        )
    return scores.masked_fill(~preserve_mask, float("-inf"))


def keep_mask(
    scores: torch.Tensor,
    sparsity: float,
    structure: Structure,
    dim: int | None,
    preserve_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The keep mask for `scores` (out, in) under `structure`; never revives a preserved zero.

    If more weights are already pruned than the target count, they all stay pruned (the `&`).
    For N:M the pattern fixes the sparsity, so `sparsity` is only validated.
    """
    check_sparsity(sparsity)
    scores = preserved(scores, preserve_mask)
    if structure.is_nm:
        structure.check_columns(scores.shape[1])
        mask = nm_keep_mask(scores, structure.n, structure.m)
    else:
        mask = topk_keep_mask(scores, sparsity, dim)
    return mask if preserve_mask is None else mask & preserve_mask
