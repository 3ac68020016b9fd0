"""Schedules as pure functions of the step: the learning rate factor and gradual pruning (GMP)."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str = "linear") -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warmup, then linear/cosine decay or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler '{kind}'; use linear, cosine or constant")


def gmp_sparsity(step: int, initial: float, final: float, start: int, end: int, every: int) -> float | None:
    """Target sparsity of gradual magnitude pruning at `step`, or None when the mask is not updated then.

    Zhu & Gupta's cubic schedule: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_n - t0))^3, applied
    at t0, t0 + every, ... and at t_n exactly (so the final sparsity is always reached).
    """
    if step < start or step > end:
        return None
    if step != end and (step - start) % every:
        return None
    progress = 1.0 if end == start else (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def gmp_plan(initial: float, final: float, start: int, end: int, every: int) -> dict[int, float]:
    """Every step at which the GMP mask changes, with its sparsity."""
    plan = {}
    for step in range(start, end + 1):
        s = gmp_sparsity(step, initial, final, start, end, every)
        if s is not None:
            plan[step] = s
    return plan
