"""SLoRB, sparse low-rank boosting (Huang et al., AAAI 2025, "Pruning Large Language Models with
Semi-Structural Adaptive Sparse Training", section 3.3): a small side branch beside an N:M linear
that gives back part of what pruning took,

    y = (W * M) x + S (P x),

where P (in/k, in) sums each group of k consecutive inputs and S (out, in/k) is trained. S is
initialised from the pruned weights' mean per group ("mean"): for an input constant within each
group the branch then reproduces the pruned part exactly. Its cost is 1/k of the layer.

The branch cannot be folded into N:M weights, so it lives as a child module `slorb` of its linear,
added to the linear's output by a forward hook (the mechanism `torch.nn.utils.prune` uses), and is
saved beside the weights in its own file, `slorb.safetensors`, which `load_model` restores. A plain
Hugging Face load ignores that file and gets the N:M model without the branch; `merge_slorb` folds
the branch into dense weights for stacks that need one plain checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefit.models import side_modules as sides
from sparsefit.models.layout import set_weight_out_in, weight_as_out_in

SLORB_FILE = "slorb.safetensors"
_FORMAT = "sparsefit-slorb-1"
_ATTR = "slorb"
SlorbInit = Literal["mean", "zero"]


def group_sum_matrix(in_features: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """P (in/k, in): row g has ones on inputs g*k .. g*k+k-1."""
    return torch.eye(in_features // k, dtype=dtype).repeat_interleave(k, dim=1)


def slorb_init(weight: torch.Tensor, keep: torch.Tensor, k: int, kind: SlorbInit = "mean") -> torch.Tensor:
    """S (out, in/k) for a layer whose weight is `weight` (out, in) and keep mask `keep`: the mean of the
    pruned weights of each group of k inputs ("mean"), or zeros ("zero")."""
    out_features, in_features = weight.shape
    if in_features % k:
        raise ValueError(f"SLoRB groups of {k} inputs need in_features divisible by {k}, got {in_features}")
    if kind == "zero":
        return weight.new_zeros(out_features, in_features // k, dtype=torch.float32)
    pruned = (weight.float() * ~keep).reshape(out_features, in_features // k, k)
    return pruned.mean(dim=2)


class SLoRB(nn.Module):
    """The branch S (P x) of one linear; P is the fixed group sum unless `trainable_projection`."""

    def __init__(self, in_features: int, out_features: int, k: int, trainable_projection: bool = False) -> None:
        super().__init__()
        if k < 1 or in_features % k:
            raise ValueError(f"SLoRB groups of {k} inputs need in_features divisible by {k}, got {in_features}")
        self.k = k
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // k))
        self.projection = nn.Parameter(group_sum_matrix(in_features, k)) if trainable_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is None:  # the fixed P as a reshape and sum: no (in/k, in) matmul
            px = x.unflatten(-1, (-1, self.k)).sum(-1)
        else:
            px = F.linear(x, self.projection.to(x.dtype))
        return F.linear(px, self.weight.to(px.dtype))

    def dense_delta(self) -> torch.Tensor:
        """S P as an (out, in) matrix: what the branch adds to a dense weight."""
        projection = (
            self.projection if self.projection is not None else group_sum_matrix(self.k * self.weight.shape[1], self.k)
        )
        return self.weight.detach().float() @ projection.detach().float().to(self.weight.device)


def _add_branch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.slorb(args[0])


def slorb_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The linears of `model` that carry a SLoRB branch, by module name."""
    return sides.side_modules(model, _ATTR, SLoRB)


def attach_slorb(
    linears: dict[str, nn.Module],
    k: int,
    init: dict[str, torch.Tensor] | None = None,
    trainable_projection: bool = False,
) -> int:
    """Add a branch to each linear of `linears` (S from `init[name]`, else zeros); returns the parameters added."""
    added = 0
    for name, module in linears.items():
        out_features, in_features = weight_as_out_in(module).shape
        branch = SLoRB(in_features, out_features, k, trainable_projection)
        branch.to(device=module.weight.device)
        if init is not None and name in init:
            branch.weight.data.copy_(init[name])
        sides.attach_side(module, _ATTR, branch, _add_branch, name)
        added += sum(p.numel() for p in branch.parameters())
    return added


def detach_slorb(model: nn.Module) -> int:
    """Remove every branch (the model becomes the plain N:M one); returns how many were removed."""
    return sides.detach_sides(model, _ATTR, SLoRB)


@torch.no_grad()
def merge_slorb(model: nn.Module) -> int:
    """Fold every branch into its linear's weight (W += S P, which is dense) and remove the branches."""
    found = slorb_modules(model)
    for module in found.values():
        weight = weight_as_out_in(module)
        set_weight_out_in(module, weight + module.slorb.dense_delta().to(device=weight.device, dtype=weight.dtype))
    return detach_slorb(model)


def slorb_state(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The branches' tensors by state-dict name (from `state_dict` when given: the gathered weights of a
    sharded model)."""
    return sides.side_state(model, _ATTR, state_dict)


def slorb_info(model: nn.Module) -> dict | None:
    """What `sparsity.json` records about the branches, or None without any."""
    found = slorb_modules(model)
    if not found:
        return None
    first = next(iter(found.values())).slorb
    return {
        "file": SLORB_FILE,
        "k": first.k,
        "trainable_projection": first.projection is not None,
        "layers": len(found),
        "parameters": sum(p.numel() for m in found.values() for p in m.slorb.parameters()),
    }


def save_slorb(tensors: dict[str, torch.Tensor], folder: str | os.PathLike, k: int) -> None:
    sides.save_side_file(tensors, Path(folder) / SLORB_FILE, {"format": _FORMAT, "k": str(k)})


def load_slorb(model: nn.Module, folder: str | os.PathLike) -> int | None:
    """Restore the branches saved in `folder` (None when it has no SLoRB file); returns the layers restored."""
    found = sides.read_side_file(model, folder, SLORB_FILE, _ATTR, _FORMAT, "SLoRB")
    if found is None:
        return None
    tensors, meta, modules = found
    path = Path(folder) / SLORB_FILE
    if not meta.get("k", "").isdigit() or int(meta["k"]) < 1:
        raise ValueError(f"{path} is not a sparsefit SLoRB file (no group size k >= 1)")
    k = int(meta["k"])
    trainable = any(key.endswith(".slorb.projection") for key in tensors)
    for name, module in modules.items():  # every tensor checked before any branch is attached
        out_features, in_features = weight_as_out_in(module).shape
        if in_features % k:
            raise ValueError(f"{path}: k {k} does not divide the {in_features} inputs of {name}")
        expected = {"weight": (out_features, in_features // k)}
        if trainable:
            expected["projection"] = (in_features // k, in_features)
        for part, shape in expected.items():
            key = f"{name}.slorb.{part}"
            t = tensors.get(key)
            if t is None:
                raise ValueError(f"{path} lacks tensor {key} (float {shape})")
            if not t.is_floating_point() or tuple(t.shape) != shape:
                raise ValueError(f"{path}: tensor {key} is {sides.describe(t)}; expected float {shape}")
    attach_slorb(modules, k, trainable_projection=trainable)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    wrong = [m for m in missing if ".slorb." in m] + list(unexpected)
    if wrong:
        raise ValueError(f"{path} does not match the model's branches ({', '.join(sorted(wrong)[:2])})")
    for module in modules.values():
        module.slorb.to(dtype=module.weight.dtype)
    return len(modules)
