"""GPTQ and round-to-nearest as methods of the layer-by-layer driver (`sparsefit.pruning.pipeline`).

The driver hands each input group's weights with their keep masks (`preserve_zeros`: the nonzero
weights); the solver returns the dequantized weights, zero wherever the mask is, and records each
layer's scales and the weights it revived (none, checked here on every layer) in `QuantizeSink`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from sparsefit.errors import UsageError
from sparsefit.pruning.stats import InputStats
from sparsefit.quantization.gptq import gptq
from sparsefit.quantization.observer import Observer, choose_scale
from sparsefit.quantization.scheme import Grid, group_view


@dataclass
class QuantizeSink:
    """What quantizing each layer produced, by layer name."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # (out, groups)
    revived: dict[str, int] = field(default_factory=dict)  # zeros before that are nonzero after


@dataclass(frozen=True)
class QuantOptions:
    name: str  # "gptq" | "rtn"
    grid: Grid
    sink: QuantizeSink
    block_size: int = 128
    damp: float = 0.01
    scale_dtype: torch.dtype = torch.float32  # the dtype the scales are stored in
    reconstruct_iters: int = 0  # the driver's refit: not for quantized weights
    actorder: Literal["static", "none"] = "static"  # not "dynamic": its column map is not exported
    observer: Observer = "mse"

    @property
    def needs_sq_sum(self) -> bool:
        return False

    @property
    def needs_hessian(self) -> bool:
        return self.name == "gptq"

    @property
    def needs_data(self) -> bool:
        return self.name == "gptq"

    def solver(self, stats: InputStats | None) -> QuantSolver:
        return QuantSolver(self, stats)


class QuantSolver:
    """Quantizes the linears of one input group; GPTQ inverts their shared Hessian once and solves
    them stacked by rows (rows are independent, and each row has its own scales)."""

    def __init__(self, options: QuantOptions, stats: InputStats | None) -> None:
        self.options, self.stats = options, stats

    def solve_shared(
        self,
        names: list[str],
        weights: list[torch.Tensor],
        sparsities: list[float],
        preserves: list[torch.Tensor | None],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        o = self.options
        keep = torch.cat([w != 0 if p is None else p for w, p in zip(weights, preserves)])
        stacked = torch.cat(weights)
        if o.name == "rtn":
            groups = group_view((stacked * keep).float(), o.grid.group_size)
            scale = choose_scale(groups, o.grid, o.observer, o.scale_dtype)
            quantized = o.grid.fake_quantize(groups, scale.unsqueeze(-1)).reshape(stacked.shape)
        else:
            hessian = self.stats.hessian(names[0]).to(stacked.device)
            quantized, scale, _ = gptq(
                stacked, hessian, o.grid, keep, o.actorder, o.observer, o.damp, o.block_size, o.scale_dtype
            )
        rows = [w.shape[0] for w in weights]
        results = []
        for name, w, q, s, k in zip(names, weights, quantized.split(rows), scale.split(rows), keep.split(rows)):
            if not torch.isfinite(s).all():  # a scale beyond the export dtype's range is inf there
                dtype = str(o.scale_dtype).removeprefix("torch.")
                raise UsageError(
                    f"{name}: its weight scales overflow {dtype} (weights up to "
                    f"{float(w.abs().max()):.4g}); use --export-dtype bfloat16 or float32"
                )
            revived = int(((q != 0) & ~k).sum())
            if revived:  # the math guarantees none; a revived weight is a bug, never a silent result
                raise RuntimeError(f"quantizing {name} revived {revived} pruned weights")
            o.sink.scales[name] = s
            o.sink.revived[name] = revived
            results.append((q.to(weights[0].dtype), k))
        return results

    def release(self, name: str, statistics: bool = True) -> None:
        if self.stats is not None and statistics:
            self.stats.release(name)

    def data_free(self) -> QuantSolver:
        """Round-to-nearest on the same grid, into the same sink: GPTQ for an expert no token reaches."""
        o = self.options
        return QuantOptions("rtn", o.grid, o.sink, scale_dtype=o.scale_dtype, observer=o.observer).solver(None)

    def reconstruct(self, name: str, weight: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("quantized weights are not refit")
