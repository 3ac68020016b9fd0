"""Row-delta adapters, the pruning-based sparse PEFT of "An Efficient Sparse Fine-Tuning with Low
Quantization Error via Neural Network Pruning": each targeted linear gets a trainable delta D
(R, in) on R chosen output rows (`rows`), the base frozen,

    y = W x + scatter_rows(D x),    i.e. W'[rows] = W[rows] + D.

The delta starts at zero, so the model is unchanged at step 0 (the reference initialises it at
random, which perturbs the model before training). On a sparse base, D is multiplied by the base's
keep mask on those rows (`keep`): merging, W[rows] += D * M[rows], then revives no pruned weight,
and the merged model computes what the unmerged one did. On a quantized base, D may start from the
rows of the quantization residual W - dequant(quant(W)), which gives those rows back exactly.

Each delta is a child module `row_delta` of its linear, added to the linear's output by a forward
hook (as SLoRB is), saved in its own file (`row_adapters.safetensors`) when not merged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models import side_modules as sides
from sparsefit.models.layout import set_weight_out_in, weight_as_out_in

ROWS_FILE = "row_adapters.safetensors"
_FORMAT = "sparsefit-rows-1"
_ATTR = "row_delta"


class RowDelta(nn.Module):
    """The trainable rows of one linear: `delta` (R, in) in float32, added to output rows `rows`."""

    def __init__(
        self, rows: torch.Tensor, in_features: int, keep: torch.Tensor | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if rows.dim() != 1 or len(torch.unique(rows)) != len(rows):
            raise ValueError("rows must be a 1-D tensor of distinct output rows")
        if keep is not None and keep.shape != (len(rows), in_features):
            raise ValueError(f"keep {tuple(keep.shape)} must be (rows, in) = ({len(rows)}, {in_features})")
        self.register_buffer("rows", rows.to(torch.long))
        self.register_buffer("keep", None if keep is None else keep.to(torch.bool))
        self.delta = nn.Parameter(torch.zeros(len(rows), in_features, device=rows.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def effective(self) -> torch.Tensor:
        """D * M[rows] on a sparse base, D otherwise."""
        return self.delta if self.keep is None else self.delta * self.keep

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        update = F.linear(self.dropout(x), self.effective().to(x.dtype))  # (..., R)
        return out.index_add(out.dim() - 1, self.rows, update.to(out.dtype))


def _add_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.row_delta(args[0], output)


def row_delta_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The linears of `model` that carry a row delta, by module name."""
    return sides.side_modules(model, _ATTR, RowDelta)


def attach_row_deltas(
    linears: dict[str, nn.Module],
    rows: dict[str, torch.Tensor],
    keep: dict[str, torch.Tensor] | None = None,
    dropout: float = 0.0,
    init: dict[str, torch.Tensor] | None = None,
) -> int:
    """Give each linear of `linears` a delta on `rows[name]`; `keep[name]` is its base's (out, in) keep
    mask (a sparse base), `init[name]` a starting delta (R, in). Returns the parameters added."""
    added = 0
    for name, module in linears.items():
        weight = weight_as_out_in(module)
        chosen = rows[name].to(weight.device)
        mask = None if keep is None or name not in keep else keep[name].to(weight.device).index_select(0, chosen)
        branch = RowDelta(chosen, weight.shape[1], mask, dropout)
        if init is not None and name in init:
            branch.delta.data.copy_(init[name])
        sides.attach_side(module, _ATTR, branch, _add_rows, name)
        added += branch.delta.numel()
    return added


def detach_row_deltas(model: nn.Module) -> int:
    """Remove every row delta (the base model again); returns how many were removed."""
    return sides.detach_sides(model, _ATTR, RowDelta)


@torch.no_grad()
def merge_row_deltas(model: nn.Module) -> int:
    """Fold every delta into its weight (W[rows] += D * M[rows]) and remove the deltas; returns their number."""
    found = row_delta_modules(model)
    for module in found.values():
        branch = module.row_delta
        weight = weight_as_out_in(module)
        merged = weight.float()
        merged[branch.rows] += branch.effective().detach().float().to(weight.device)
        set_weight_out_in(module, merged.to(weight.dtype))
    return detach_row_deltas(model)


def refuse_row_deltas(model: nn.Module, what: str) -> None:
    """A usage error when `model` carries unmerged row adapters, which `what` would ignore or break."""
    if row_delta_modules(model):
        raise UsageError(
            f"the model carries unmerged row adapters (row_adapters.safetensors), which {what} cannot take "
            "along: first `sparsefit export --row-adapters merge`, then use that"
        )


def row_delta_state(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The deltas' tensors by state-dict name (from `state_dict` when given: a sharded model's gathered weights)."""
    return sides.side_state(model, _ATTR, state_dict)


def row_delta_info(model: nn.Module) -> dict | None:
    """What `sparsity.json` and the metrics record about the deltas, or None without any."""
    found = row_delta_modules(model)
    if not found:
        return None
    return {
        "file": ROWS_FILE,
        "layers": len(found),
        "rows": sum(len(m.row_delta.rows) for m in found.values()),
        "parameters": sum(m.row_delta.delta.numel() for m in found.values()),
    }


def save_row_deltas(tensors: dict[str, torch.Tensor], folder: str | os.PathLike) -> None:
    sides.save_side_file(tensors, Path(folder) / ROWS_FILE, {"format": _FORMAT})


def load_row_deltas(model: nn.Module, folder: str | os.PathLike) -> int | None:
    """Restore the deltas saved in `folder` (None when it has no row-adapter file); returns the layers restored."""
    found = sides.read_side_file(model, folder, ROWS_FILE, _ATTR, _FORMAT, "row-adapter")
    if found is None:
        return None
    tensors, _, modules = found
    path = Path(folder) / ROWS_FILE
    names = list(modules)
    for name in names:  # every tensor checked before any delta is attached
        _check_row_tensors(path, name, tensors, modules[name])
    rows = {n: tensors[f"{n}.row_delta.rows"] for n in names if f"{n}.row_delta.rows" in tensors}
    if len(rows) != len(names):
        raise ValueError(f"{path} lacks the rows of some deltas")
    try:
        keep = {
            n: _full_keep(tensors[f"{n}.row_delta.keep"], rows[n], modules[n])
            for n in names
            if f"{n}.row_delta.keep" in tensors
        }
    except (RuntimeError, IndexError) as err:
        raise ValueError(f"{path} does not fit the model's layers ({str(err).splitlines()[0]})") from None
    init = {n: tensors[f"{n}.row_delta.delta"] for n in names if f"{n}.row_delta.delta" in tensors}
    if len(init) != len(names):
        raise ValueError(f"{path} lacks the values of some deltas")
    try:
        attach_row_deltas(modules, rows, keep, init=init)
    except (RuntimeError, IndexError, ValueError) as err:  # shapes of another model
        detach_row_deltas(model)
        raise ValueError(f"{path} does not fit the model's layers ({str(err).splitlines()[0]})") from None
    return len(names)


def _check_row_tensors(path: Path, name: str, tensors: dict[str, torch.Tensor], module: nn.Module) -> None:
    """A ValueError naming the file, the tensor and what was expected when `name`'s delta tensors do
    not fit its linear: rows 1-D integers, distinct, in [0, out); delta float (R, in); keep (R, in)."""
    out_features, in_features = weight_as_out_in(module).shape
    rows = tensors.get(f"{name}.row_delta.rows")
    if rows is None:
        raise ValueError(f"{path} lacks tensor {name}.row_delta.rows")
    if rows.dtype not in (torch.int64, torch.int32) or rows.dim() != 1 or not 0 < rows.numel() <= out_features:
        raise ValueError(
            f"{path}: tensor {name}.row_delta.rows is {sides.describe(rows)}; expected int64 (R,), R from 1 to "
            f"{out_features}"
        )
    if int(rows.min()) < 0 or int(rows.max()) >= out_features or len(torch.unique(rows)) != len(rows):
        raise ValueError(
            f"{path}: tensor {name}.row_delta.rows holds rows outside 0..{out_features - 1} or repeats one; "
            "expected distinct output rows of the layer"
        )
    shape = (rows.numel(), in_features)
    for part, floating in (("delta", True), ("keep", False)):
        t = tensors.get(f"{name}.row_delta.{part}")
        if t is None:
            if part == "delta":
                raise ValueError(f"{path} lacks tensor {name}.row_delta.delta (float {shape})")
            continue
        kind_ok = t.is_floating_point() if floating else t.dtype in (torch.bool, torch.uint8)
        if not kind_ok or tuple(t.shape) != shape:
            raise ValueError(
                f"{path}: tensor {name}.row_delta.{part} is {sides.describe(t)}; expected "
                f"{'float' if floating else 'bool'} {shape}"
            )


def _full_keep(row_keep: torch.Tensor, rows: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """An (out, in) keep mask whose `rows` are `row_keep`: what `attach_row_deltas` takes."""
    full = torch.ones_like(weight_as_out_in(module), dtype=torch.bool)
    full[rows.to(full.device)] = row_keep.to(device=full.device, dtype=torch.bool)
    return full
