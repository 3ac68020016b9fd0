"""Layer-by-layer driver: capture block 0's inputs, then per block collect statistics, prune,
and feed the block's pruned outputs to the next one. Only the current block (and one batch
of activations) needs to be on the compute device; activations wait on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsefit.errors import UsageError
from sparsefit.models.layout import (
    DecoderLayout,
    decoder_layout,
    move_except_blocks,
    select_linears,
    set_weight_out_in,
    weight_as_out_in,
)
from sparsefit.pruning.methods import BlockSolver, MethodOptions
from sparsefit.pruning.owl import outlier_ratio
from sparsefit.pruning.stats import InputStats
from sparsefit.pruning.wanda import wanda_scores

# (hidden states, other positional args, keyword args) of one batch entering a block
BlockInput = tuple[torch.Tensor, tuple, dict]


class _Captured(Exception):
    """Raised by the block-0 pre-hook: the rest of the model need not run."""


@dataclass
class LayerwiseReport:
    per_layer: dict[str, dict] = field(default_factory=dict)  # name -> target, sparsity, shape
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase

    def add_time(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds


@dataclass
class BlockRunner:
    """Runs one block over every calibration batch, on `device`, optionally under bf16 autocast."""

    device: torch.device
    bf16: bool = False

    def autocast(self):  # noqa: ANN201
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def run(
        self,
        block: nn.Module,
        inputs: list[BlockInput],
        after_each: Callable[[], None] | None = None,
        replace: bool = False,
    ) -> None:
        """Run `block` on every batch; with `replace`, each batch's hidden states become its outputs
        (in place, so propagating costs no second activation buffer)."""
        with self.autocast():
            for hidden, args, kwargs in inputs:
                out = block(hidden.to(self.device), *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                if replace:
                    hidden.copy_(out)
                if after_each is not None:
                    after_each()


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    layout: DecoderLayout,
    calib: torch.Tensor | list[torch.Tensor],
    batch_size: int,
    device: torch.device,
) -> list[BlockInput]:
    """Run the model on `calib` up to block 0 and keep what block 0 receives, per batch.

    `calib` is (N, L) token ids cut into batches of `batch_size`, or a list of ready batches
    (B_i, L_i), e.g. one variable-length dataset row each.
    """
    captured: list[BlockInput] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach().to("cpu"), tuple(args[1:]), kwargs))
        raise _Captured

    move_except_blocks(model, layout, device)
    handle = layout.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in calib.split(batch_size) if isinstance(calib, torch.Tensor) else calib:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def select_block_linears(
    layout: DecoderLayout, targets: list[str] | None, ignore: list[str] | None
) -> list[dict[str, nn.Module]]:
    per_block = [
        select_linears(block, f"{layout.prefix}.{i}", targets, ignore) for i, block in enumerate(layout.blocks)
    ]
    if not any(per_block):
        raise UsageError(
            f"no prunable layer matches targets {targets} (ignore {ignore}); layers look like "
            f"'{layout.prefix}.0.<name>': fix the --targets regex"
        )
    return per_block


def owl_outlier_ratios(
    layout: DecoderLayout,
    per_block: list[dict[str, nn.Module]],
    inputs: list[BlockInput],
    runner: BlockRunner,
    m: float,
    progress: bool = True,
) -> list[float]:
    """OWL's layer outlier ratios from Wanda scores of the dense model (one dense pass over all blocks).

    Consumes `inputs`: they end as the outputs of the last block.
    """
    ratios = []
    for block, layers in tqdm(list(zip(layout.blocks, per_block)), desc="owl ratios", disable=not progress):
        home = next(block.parameters()).device
        block.to(runner.device)
        with InputStats(layers, sq_sum=True) as stats:
            runner.run(block, inputs, stats.end_forward, replace=True)  # dense outputs feed the next block
        scores = [wanda_scores(weight_as_out_in(mod), stats.sq_sum(name)) for name, mod in layers.items()]
        ratios.append(outlier_ratio(scores, m) if scores else 0.0)
        block.to(home)
    return ratios


def prune_layerwise(
    model: nn.Module,
    options: MethodOptions,
    sparsity_of: Callable[[int, str], float],
    inputs: list[BlockInput] | None,
    per_block: list[dict[str, nn.Module]],
    runner: BlockRunner,
    preserve_zeros: bool = False,
    progress: bool = True,
    report: LayerwiseReport | None = None,
) -> LayerwiseReport:
    """Prune every selected linear block by block; `sparsity_of(block_index, name)` gives each target.

    The linears of a block are all solved from statistics of the *dense* block (fed by the
    already-pruned earlier blocks); the block's outputs are then recomputed with pruned weights.
    """
    layout = decoder_layout(model)
    report = report or LayerwiseReport()
    if options.needs_data and inputs is None:
        raise UsageError(f"{options.name} needs calibration data; pass --calib DATASET or --calib self")
    last = max(i for i, layers in enumerate(per_block) if layers)
    bar = tqdm(total=last + 1, desc=f"{options.name}", unit="block", disable=not progress)
    for i, (block, layers) in enumerate(zip(layout.blocks, per_block)):
        if i > last:
            break
        home = next(block.parameters()).device
        block.to(runner.device)
        stats = None
        if options.needs_data and layers:
            t = time.perf_counter()
            with InputStats(layers, sq_sum=options.needs_sq_sum, hessian=options.needs_hessian) as stats:
                runner.run(block, inputs, stats.end_forward)
            report.add_time("statistics", time.perf_counter() - t)
        t = time.perf_counter()
        solver = BlockSolver(options, stats)
        for name, module in layers.items():
            weight = weight_as_out_in(module)
            target = sparsity_of(i, name)
            preserve = weight != 0 if preserve_zeros else None
            pruned, mask = solver.solve(name, weight, target, preserve)
            set_weight_out_in(module, pruned)
            report.per_layer[name] = {
                "target": target,
                "sparsity": 1.0 - mask.sum().item() / mask.numel(),
                "shape": list(weight.shape),
            }
        del solver, stats
        report.add_time("solve", time.perf_counter() - t)
        if options.needs_data and i < last:
            t = time.perf_counter()
            runner.run(block, inputs, replace=True)
            report.add_time("propagate", time.perf_counter() - t)
        block.to(home)
        bar.update(1)
    bar.close()
    return report
