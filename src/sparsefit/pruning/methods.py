"""Which statistics each method needs, and how one block's linears are solved with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sparsefit.pruning.magnitude import prune_magnitude
from sparsefit.pruning.reconstruct import reconstruct
from sparsefit.pruning.sparsegpt import inverse_hessian, prune_sparsegpt
from sparsefit.pruning.stats import InputStats
from sparsefit.pruning.structure import Structure
from sparsefit.pruning.wanda import prune_wanda

METHODS = ("magnitude", "wanda", "sparsegpt")


class GroupSolver(Protocol):
    def solve_shared(
        self,
        names: list[str],
        weights: list[torch.Tensor],
        sparsities: list[float],
        preserves: list[torch.Tensor | None],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def reconstruct(
        self, name: str, weight: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor: ...

    def release(self, name: str, statistics: bool = True) -> None:
        """Free what solving `name`'s group needed: its inverse Hessian, and with `statistics` its
        statistics too (the group is done)."""
        ...

    def data_free(self) -> GroupSolver:
        """The solver for a group with no statistics (an expert no calibration token reaches)."""
        ...


class LayerMethod(Protocol):
    """What the layer-by-layer driver asks of a method: the statistics it needs, and a solver of one
    block's input groups from them (`MethodOptions` for pruning; quantization has its own)."""

    name: str
    reconstruct_iters: int

    @property
    def needs_sq_sum(self) -> bool: ...

    @property
    def needs_hessian(self) -> bool: ...

    @property
    def needs_data(self) -> bool: ...

    def solver(self, stats: InputStats | None) -> GroupSolver: ...


@dataclass(frozen=True)
class MethodOptions:
    name: str
    structure: Structure = Structure()
    block_size: int = 128  # SparseGPT column block
    damp: float = 0.01  # SparseGPT dampening, a fraction of mean(diag H)
    magnitude_scope: str = "layer"  # "layer" | "row"
    reconstruct_iters: int = 0  # conjugate-gradient steps of least-squares reconstruction after the mask; 0: off

    @property
    def needs_sq_sum(self) -> bool:
        return self.name == "wanda"

    @property
    def needs_hessian(self) -> bool:
        return self.name == "sparsegpt" or self.reconstruct_iters > 0

    @property
    def needs_data(self) -> bool:
        return self.name != "magnitude"

    def solver(self, stats: InputStats | None) -> BlockSolver:
        return BlockSolver(self, stats)


class BlockSolver:
    """Prunes the linears of one block from its statistics; inverts each shared Hessian once."""

    def __init__(self, options: MethodOptions, stats: InputStats | None) -> None:
        self.options, self.stats = options, stats
        self._hinv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def solve(
        self, name: str, weight: torch.Tensor, sparsity: float, preserve: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """weight: (out, in) -> (pruned weight, keep mask)."""
        o = self.options
        if o.name == "magnitude":
            return prune_magnitude(weight, sparsity, o.structure, o.magnitude_scope, preserve)
        if o.name == "wanda":
            return prune_wanda(weight, self.stats.sq_sum(name).to(weight.device), sparsity, o.structure, preserve)
        hinv, dead = self._inverse(name, weight.device)
        return prune_sparsegpt(weight, hinv, dead, sparsity, o.structure, o.block_size, preserve)

    def _inverse(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.stats.root(name)
        if root not in self._hinv:
            self._hinv[root] = inverse_hessian(self.stats.hessian(name).to(device), self.options.damp)
        return self._hinv[root]

    def solve_shared(
        self,
        names: list[str],
        weights: list[torch.Tensor],
        sparsities: list[float],
        preserves: list[torch.Tensor | None],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Several linears fed one input (q/k/v, gate/up), or just one, each as `solve` would prune it alone.

        SparseGPT solves them stacked by rows in one pass: its per-column steps are mostly dispatch
        (the cost hardly grows with the rows), so one pass instead of three saves most of that overhead.
        """
        if self.options.name != "sparsegpt" or len(weights) == 1:
            return [self.solve(*args) for args in zip(names, weights, sparsities, preserves)]
        o = self.options
        hinv, dead = self._inverse(names[0], weights[0].device)
        preserve = None
        if any(p is not None for p in preserves):
            preserve = torch.cat(
                [torch.ones_like(w, dtype=torch.bool) if p is None else p for w, p in zip(weights, preserves)]
            )
        rows = [w.shape[0] for w in weights]
        groups = list(zip(rows, sparsities))
        pruned, keep = prune_sparsegpt(torch.cat(weights), hinv, dead, 0.0, o.structure, o.block_size, preserve, groups)
        return list(zip(pruned.split(rows), keep.split(rows)))

    def release(self, name: str, statistics: bool = True) -> None:
        if self.stats is None:
            return
        self._hinv.pop(self.stats.root(name), None)
        if statistics:
            self.stats.release(name)

    def data_free(self) -> BlockSolver:
        return MethodOptions("magnitude", self.options.structure).solver(None)

    def reconstruct(self, name: str, weight: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Refit the kept weights of `pruned` to `weight`'s outputs on the calibration inputs (mask unchanged).

        Rows are independent, so linears that share `name`'s input may come stacked by rows.
        """
        H = self.stats.hessian(name).to(weight.device)
        return reconstruct(weight, pruned, keep, H, self.options.reconstruct_iters, self.options.damp)
