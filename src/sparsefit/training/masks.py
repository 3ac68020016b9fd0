"""Sparsity masks of a model's decoder linears: taken from zeros, enforced on gradients and weights.

A mask is a bool "keep" tensor per linear (True = trainable weight, False = pruned, held at 0),
the same convention as the pruning functions. Masks live beside the parameters (same device,
same shape as `module.weight`, Conv1D included), so enforcing them is one multiply. Under FSDP the
masks are DTensors sharded like their weights (`shard`); counts are summed over the ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from sparsefit.models.experts import fuse_expert_matrices
from sparsefit.models.layout import decoder_layout
from sparsefit.pruning.pipeline import select_block_linears
from sparsefit.training.sharding import full, global_sum, like, local


class SparsityMasks:
    """Keep masks by module name, bound to the modules of one model."""

    def __init__(self, modules: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(masks) - set(modules))
        if missing:
            raise ValueError(f"masks name modules the model does not have: {', '.join(missing[:3])}")
        self.modules = {name: modules[name] for name in masks}
        self.masks = {name: m.to(device=modules[name].weight.device, dtype=torch.bool) for name, m in masks.items()}
        self._sparsity: float | None = None  # cached: logged every step, changes only through set()
        for name, mask in self.masks.items():
            if mask.shape != self.modules[name].weight.shape:
                raise ValueError(
                    f"mask of {name} has shape {tuple(mask.shape)}, weight {tuple(self.modules[name].weight.shape)}"
                )

    @classmethod
    def from_zeros(
        cls, model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
    ) -> SparsityMasks:
        """Every exact zero of the targeted linears is a pruned weight."""
        modules = decoder_linears(model, targets, ignore)
        return cls(modules, {name: m.weight.detach() != 0 for name, m in modules.items()})

    def items(self) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
        for name, mask in self.masks.items():
            yield name, self.modules[name], mask

    def set(self, name: str, mask: torch.Tensor) -> None:
        """Replace one mask (full, the same on every rank; sharded here like its weight under FSDP)."""
        self.masks[name] = like(mask.to(device=local(self.modules[name].weight).device), self.modules[name].weight)
        self._sparsity = None

    def shard(self) -> None:
        """Lay every mask out as its (now FSDP-sharded) weight: each rank keeps the part it trains."""
        for name in list(self.masks):
            self.set(name, self.masks[name])

    @property
    def sharded(self) -> bool:
        return any(isinstance(m, DTensor) for m in self.masks.values())

    # Enforcing multiplies by the bool mask (a vectorised multiply is cheaper than masked_fill_ on CPU)
    # and runs twice per step. Pruned weights stay +0.0: their gradients and Adam moments are zero, so
    # AdamW leaves them at +0.0 before the multiply.
    @torch.no_grad()
    def apply_to_weights(self) -> None:
        for _, module, mask in self.items():
            module.weight.mul_(mask)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        for _, module, mask in self.items():
            if module.weight.grad is not None:
                module.weight.grad.mul_(mask)

    @torch.no_grad()
    def apply_to_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's per-weight state (Adam moments) at pruned positions.

        Needed when a mask grows (gradual pruning): otherwise a stale momentum would move a
        freshly pruned weight away from zero at the next step.
        """
        for _, module, mask in self.items():
            for value in optimizer.state.get(module.weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    value.mul_(mask)

    @torch.no_grad()
    def revived(self) -> int:
        """Pruned weights that are not exactly zero: must always be 0. Under FSDP every rank must call it."""
        local_count = sum(int((local(module.weight)[~local(mask)] != 0).sum()) for _, module, mask in self.items())
        return int(global_sum(local_count, self.sharded))

    def sparsity(self) -> float:
        """Fraction of masked weights that are pruned (cached; under FSDP every rank must call it)."""
        if self._sparsity is None:
            pruned = global_sum(sum(int((~local(m)).sum()) for m in self.masks.values()), self.sharded)
            self._sparsity = pruned / max(sum(m.numel() for m in self.masks.values()), 1)
        return self._sparsity

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full masks on CPU (under FSDP an all-gather per mask: every rank must call it)."""
        return {name: full(m).cpu().contiguous() for name, m in self.masks.items()}


def decoder_linears(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None) -> dict:
    """The prunable linears of every decoder block, by full module name (embeddings and head excluded);
    the same selection one-shot pruning makes, so masks cover exactly what was pruned. A fused expert
    tensor is one entry (`FusedWeight`, its 3-D parameter), by its parameter's name."""
    return {
        name: m
        for block in select_block_linears(decoder_layout(model), targets, ignore)
        for name, m in fuse_expert_matrices(block).items()
    }
