"""The one check every writer runs before its first byte goes out: no NaN, no infinity, and, when
the tensors are about to be cast to a narrower dtype, no value beyond that dtype's range.

A file holding NaN or inf loads without complaint and computes garbage (or, as an infinite
quantization scale does, silently zeroes a layer), so sparsefit never writes one: the writer
refuses, naming the tensor, and nothing is written. Readers refuse such a file as they read it
(`refuse_non_finite_input`), naming the file and the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from sparsefit.errors import SparsefitError, UsageError


class NonFiniteError(SparsefitError):
    """Tensors holding NaN / inf (or values a narrower dtype cannot hold): refused, nothing written.
    Exit code 1 (damaged data), or 2 when the user's choice (a narrow export dtype) is the cause."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def bad_values(t: torch.Tensor) -> int:
    """How many elements of `t` are NaN or infinite (0 for integer and bool tensors)."""
    if t.dtype == torch.float8_e4m3fn:  # no inf; NaN is every bit of exponent and mantissa set
        return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())
    if t.dtype in (torch.float8_e5m2,):
        return int(((t.view(torch.uint8) & 0x7C) == 0x7C).sum())
    if not t.is_floating_point():
        return 0
    finite = torch.isfinite(t)
    return 0 if bool(finite.all()) else int((~finite).sum())


def beyond(t: torch.Tensor, dtype: torch.dtype) -> int:
    """How many finite elements of `t` become infinite when cast to `dtype` (beyond its range)."""
    if not t.is_floating_point() or not dtype.is_floating_point or t.dtype == torch.float8_e4m3fn:
        return 0
    if torch.finfo(t.dtype).max <= torch.finfo(dtype).max:
        return 0
    t = t.detach()
    return int((torch.isinf(t.to(dtype)) & torch.isfinite(t)).sum())


def _named(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]):
    return tensors.items() if isinstance(tensors, Mapping) else tensors


def refuse_non_finite(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    where: str,
    fix: str = "",
    cast_to: torch.dtype | None = None,
    exit_code: int = 1,
) -> None:
    """A `NonFiniteError` naming the first tensor that holds NaN / inf (or, with `cast_to`, a value
    that dtype cannot hold, exit code 2: the dtype was chosen). `where` names what was being
    written, `fix` what to do about it."""
    for name, t in _named(tensors):
        if not isinstance(t, torch.Tensor):
            continue
        n = bad_values(t)
        if n:
            raise NonFiniteError(
                f"{where}: tensor {name} holds {n} NaN or infinite value{'s' * (n > 1)}; nothing was written"
                f"{'; ' + fix if fix else ''}",
                exit_code,
            )
        if cast_to is not None:
            n = beyond(t, cast_to)
            if n:
                big = float(t.detach().abs().nan_to_num(nan=0.0).max())
                raise NonFiniteError(
                    f"{where}: tensor {name} holds {n} value{'s' * (n > 1)} (up to {big:.4g}) beyond what "
                    f"{str(cast_to).removeprefix('torch.')} holds (max {torch.finfo(cast_to).max:.4g}); "
                    f"nothing was written{'; ' + fix if fix else ''}",
                    2,
                )


DAMAGED = "the checkpoint is damaged (a diverged run or a broken copy): re-create it from its source"


def refuse_non_finite_input(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    file: str | Path | Callable[[str], str | Path],
    fix: str = DAMAGED,
) -> None:
    """A UsageError naming the file and the first tensor read from it that holds NaN / inf. `file` is
    the file, or gives the file of a tensor by its name (a checkpoint of several files). Each tensor
    is tested where it lies (a bool of its size at a time), never copied whole."""
    for name, t in _named(tensors):
        if not isinstance(t, torch.Tensor) or t.is_meta:
            continue
        n = bad_values(t)
        if n:
            where = file(name) if callable(file) else file
            raise UsageError(f"{where}: tensor {name} holds {n} NaN or infinite value{'s' * (n > 1)}; {fix}")
