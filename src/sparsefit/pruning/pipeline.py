"""Layer-by-layer driver: capture block 0's inputs, then per block collect statistics, prune,
and feed the block's pruned outputs to the next one. Only the current block (and one batch
of activations) needs to be on the compute device; activations wait on the CPU.

Two orders within a block. The default runs the dense block once for the statistics of all its
linears, prunes them, and runs it again for the outputs. `sequential` (like `--true-sequential`
of the GPTQ reference code) runs it once: each batch's forward stops before every linear until all
batches have fed that linear's statistics, the linear is pruned, and the forwards go on, so later
linears of the block see the pruned outputs of earlier ones.

Expert matrices (slices of fused expert tensors) are solved each as a linear, from the tokens routed
to their expert. In the sequential order the forwards stop before the experts module and all its
matrices are solved there, the down projections from the dense gate/up activations. An expert that
receives fewer than `min_expert_tokens` calibration tokens is pruned by magnitude (data-free)
instead, and reported (`LayerwiseReport.starved_experts`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from greenlet import greenlet
from torch import nn
from tqdm.auto import tqdm

from sparsefit.errors import SparsefitError, UsageError
from sparsefit.models.experts import ExpertMatrix, experts_module_name
from sparsefit.models.layout import (
    DecoderLayout,
    decoder_layout,
    move_except_blocks,
    select_linears,
    set_weight_out_in,
    weight_as_out_in,
)
from sparsefit.models.offload import (
    HeapCeiling,
    offload_parameters,
    offload_tensor_,
    prefault,
    release_free_heap,
)
from sparsefit.pruning.methods import GroupSolver, LayerMethod
from sparsefit.pruning.owl import outlier_ratio
from sparsefit.pruning.stats import InputStats
from sparsefit.pruning.wanda import wanda_scores

# (hidden states, other positional args, keyword args) of one batch entering a block
BlockInput = tuple[torch.Tensor, tuple, dict]


class _Captured(Exception):
    """Raised by the block-0 pre-hook: the rest of the model need not run."""


class _StatisticsDone(Exception):
    """Raised before the last target linear of a block runs: the rest of the block need not run."""


@dataclass
class LayerwiseReport:
    per_layer: dict[str, dict] = field(default_factory=dict)  # name -> target, sparsity, shape
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    # expert matrix -> routed calibration tokens, for those pruned by magnitude for want of tokens
    starved_experts: dict[str, int] = field(default_factory=dict)
    block_seconds: list[float] = field(default_factory=list)  # wall time of each block, offload included

    def add_time(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def solving_seconds(self) -> float:
        return self.phases.get("solve", 0.0) + self.phases.get("reconstruct", 0.0)


@dataclass
class BlockRunner:
    """Runs one block over every calibration batch, on `device`, optionally under bf16 autocast.

    With `offload_dir` (low-memory mode), the sequential order's paused forwards wait with an input
    wider than the block's (the MLP's intermediate) in a file there, mapped back as they resume, and
    `heap` keeps the resident memory of later blocks near the first's (see `HeapCeiling`). Without
    offloading, each finished block's weights stay resident (a model mapped from its file is read in
    block by block), so a ceiling learned on the first block would trim in vain on every later one.
    """

    device: torch.device
    bf16: bool = False
    offload_dir: Path | None = None
    heap: HeapCeiling | None = None

    def __post_init__(self) -> None:
        if self.offload_dir is not None and self.heap is None:
            self.heap = HeapCeiling()

    def check_heap(self) -> None:
        if self.heap is not None:
            self.heap.check()

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
    def run_statistics(self, block: nn.Module, inputs: list[BlockInput], stats: InputStats) -> None:
        """Run `block` on every batch for `stats` only. After the first batch shows which of the
        linears runs last, later forwards end once it has its input: in a Llama block with every
        linear targeted that skips the down projection, about a fifth of the block."""
        order: list[nn.Module] = []
        handles = [m.register_forward_pre_hook(lambda m, a: order.append(m)) for m in stats.hook_points().values()]

        def end(module: nn.Module, args: tuple) -> None:
            raise _StatisticsDone

        try:
            with self.autocast():
                for n, (hidden, args, kwargs) in enumerate(inputs):
                    if n == 1:
                        for h in handles:
                            h.remove()
                        if order and order.count(order[-1]) == 1:  # a linear called twice would lose its 2nd input
                            handles = [order[-1].register_forward_pre_hook(end)]  # after `stats`' hooks
                    try:
                        block(hidden.to(self.device), *args, **kwargs)
                    except _StatisticsDone:
                        pass
                    stats.end_forward()
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def run_sequential(
        self,
        block: nn.Module,
        inputs: list[BlockInput],
        stats: InputStats,
        solve: Callable[[str], None],
    ) -> None:
        """One forward of `block` per batch that prunes the block on the way; outputs replace `inputs`.

        Each batch's forward is a coroutine (a greenlet, so everything stays on this thread and its
        torch state) that stops before the first linear of every input group of `stats` it reaches.
        When all batches have stopped there, `stats` holds the group's statistics over every batch:
        `solve(first)` prunes the whole group (named by its first member) and the batches resume with
        the pruned weights, so the group's other linears (k/v after q, up after gate) run pruned with
        no stop of their own. An experts module is one stop for all its matrices (`solve(module name)`).
        Activations of all batches are alive at a stop, about what one large
        batch of the whole calibration set would hold between two linears.
        """
        driver = greenlet.getcurrent()
        solved: set[str] = set()

        def stop_before(name: str):  # noqa: ANN202
            group = stats.root(name)

            def hook(module: nn.Module, args: tuple) -> None:
                if group in solved:
                    return
                offloaded = 0
                if self.offload_dir is not None and args[0].numel() > widths[stats.scope]:
                    # Wider than the block's input: the MLP's intermediate, the largest thing a paused
                    # forward holds. A narrower input is read again before the next stop (q's by k
                    # and v, gate's by up), so moving it would save nothing there.
                    offloaded = offload_tensor_(args[0], self.offload_dir)
                self.check_heap()
                driver.switch(group)
                if offloaded:
                    prefault(args[0])  # resumed: the linear reads it next

            return hook

        def forward(hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
            out = block(hidden.to(self.device), *args, **kwargs)
            hidden.copy_(out[0] if isinstance(out, tuple) else out)
            stats.end_forward()
            self.check_heap()

        # Registered after `stats`' hooks, so a batch stops only once its input is counted.
        points = stats.hook_points()
        handles = [module.register_forward_pre_hook(stop_before(name)) for name, module in points.items()]
        pending = [(i, greenlet(forward), batch) for i, batch in enumerate(inputs)]
        widths = [hidden.numel() for hidden, _, _ in inputs]
        try:
            with self.autocast():
                while pending:
                    stops: dict[str, None] = {}  # in the order the batches reached them
                    paused = []
                    for i, task, batch in pending:
                        stats.scope = i
                        name = task.switch() if task else task.switch(*batch)
                        if not task.dead:
                            stops[name] = None
                            paused.append((i, task, batch))
                    for group in stops:
                        self.check_heap()
                        # Solves run inside the forwards' bf16 autocast: outside an in-place product,
                        # every matrix product of the solver (SparseGPT's inverse, the refit) would drop to bf16.
                        with torch.autocast(device_type=self.device.type, enabled=False):
                            solve(group)
                        solved.add(group)
                        self.check_heap()
                    pending = paused
        finally:
            for h in handles:
                h.remove()
            stats.scope = None
        if self.heap is not None:
            self.heap.end_block()


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
    layout: DecoderLayout, targets: list[str] | None, ignore: list[str] | None, experts: bool = True
) -> list[dict[str, nn.Module]]:
    """Per block, the prunable linears `targets`/`ignore` select; expert matrices too unless not `experts`."""
    per_block = [
        select_linears(block, f"{layout.prefix}.{i}", targets, ignore, layout.arch if experts else None)
        for i, block in enumerate(layout.blocks)
    ]
    if not experts and layout.arch is not None:  # the routers of the row stay out all the same
        per_block = [
            {n: m for n, m in layers.items() if not any(f".{r}" in n for r in layout.arch.routers)}
            for layers in per_block
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
        with InputStats(layers, sq_sum=True) as stats:  # one sum per linear: no groups needed
            runner.run(block, inputs, stats.end_forward, replace=True)  # dense outputs feed the next block
        scores = [  # an expert no calibration token reaches has no score to count
            wanda_scores(weight_as_out_in(mod), stats.sq_sum(name))
            for name, mod in layers.items()
            if stats.root(name) in stats.sq
        ]
        ratios.append(outlier_ratio(scores, m) if scores else 0.0)
        block.to(home)
    return ratios


@dataclass
class _BlockPruner:
    """Prunes the selected linears of one block at a time, group by group (linears fed one input
    are solved together: `GroupSolver.solve_shared`)."""

    options: LayerMethod
    sparsity_of: Callable[[int, str], float]  # (block index, name) -> target sparsity
    runner: BlockRunner
    preserve_zeros: bool
    sequential: bool
    report: LayerwiseReport
    min_expert_tokens: int = 0
    expert_calibration: str = "routed"  # "routed" | "all": which tokens an expert's statistics come from

    def prune(
        self,
        index: int,
        block: nn.Module,
        groups: list[list[str]],
        layers: dict[str, nn.Module],
        inputs: list[BlockInput] | None,
        propagate: bool,
    ) -> None:
        """Prune `layers` of `block` (already on the compute device); with `propagate`, leave the
        block's pruned outputs in `inputs`."""
        if not (self.options.needs_data and layers):
            solver = self.options.solver(None)
            for group in groups:
                self.solve(index, group, layers, solver)
            if propagate and inputs is not None:  # a block with nothing to prune still feeds the next one
                t = time.perf_counter()
                self.runner.run(block, inputs, replace=True)
                self.report.add_time("propagate", time.perf_counter() - t)
            return
        stats = InputStats(
            layers,
            groups,
            sq_sum=self.options.needs_sq_sum,
            hessian=self.options.needs_hessian,
            experts_see_every_token=self.expert_calibration == "all",
        )
        solver = self.options.solver(stats)
        by_stop: dict[str, list[list[str]]] = {}  # a linear's group by its first; an experts module's groups
        for group in groups:
            expert = isinstance(layers[group[0]], ExpertMatrix)
            by_stop.setdefault(experts_module_name(group[0]) if expert else group[0], []).append(group)
        t = time.perf_counter()
        if self.sequential:
            before = self.report.solving_seconds()

            def solve_stop(stop: str) -> None:
                for group in by_stop[stop]:
                    self.solve(index, group, layers, solver)

            with stats:
                self.runner.run_sequential(block, inputs, stats, solve_stop)
            # One pruned forward is statistics and propagation at once; solving is counted apart.
            self.report.add_time("forward", time.perf_counter() - t - (self.report.solving_seconds() - before))
            self._check_all_ran([name for name in layers if name not in self.report.per_layer])
            return
        with stats:
            self.runner.run_statistics(block, inputs, stats)
        self.report.add_time("statistics", time.perf_counter() - t)
        self._check_all_ran(
            [g[0] for g in groups if g[0] not in stats.count and not isinstance(layers[g[0]], ExpertMatrix)]
        )
        for group in groups:
            self.solve(index, group, layers, solver)
        solver = stats = None  # free the block's statistics before the second forward
        if propagate:
            t = time.perf_counter()
            self.runner.run(block, inputs, replace=True)
            self.report.add_time("propagate", time.perf_counter() - t)

    def solve(self, index: int, group: list[str], layers: dict[str, nn.Module], solver: GroupSolver) -> None:
        """Prune the linears of one input group, then (with `reconstruct_iters`) refit their kept weights."""
        t = time.perf_counter()
        if isinstance(layers[group[0]], ExpertMatrix) and self.options.needs_data:
            tokens = solver.stats.count.get(solver.stats.root(group[0]), 0) if solver.stats is not None else 0
            if tokens < max(self.min_expert_tokens, 1):
                # Too few routed tokens for meaningful statistics: the data-free rule.
                self.report.starved_experts.update({n: tokens for n in group})
                solver = solver.data_free()
        weights = [weight_as_out_in(layers[n]) for n in group]
        targets = [self.sparsity_of(index, n) for n in group]
        preserves = [w != 0 if self.preserve_zeros else None for w in weights]
        try:
            results = solver.solve_shared(group, weights, targets, preserves)
        except ValueError as err:  # the math's message, e.g. a Hessian that is not positive definite
            raise SparsefitError(f"pruning {group[0]} failed: {err}") from None
        solver.release(group[0], statistics=False)  # the refit needs the Hessian, not its inverse
        self.report.add_time("solve", time.perf_counter() - t)
        if self.options.reconstruct_iters and getattr(solver, "stats", None) is not None:
            t = time.perf_counter()
            # Rows are independent: one stacked refit for the whole group.
            stacked = [torch.cat(parts) for parts in (weights, *zip(*results))]
            refit = solver.reconstruct(group[0], *stacked).split([w.shape[0] for w in weights])
            results = [(r, mask) for r, (_, mask) in zip(refit, results)]
            self.report.add_time("reconstruct", time.perf_counter() - t)
        solver.release(group[0])
        for name, (pruned, mask) in zip(group, results):
            set_weight_out_in(layers[name], pruned)
            self.report.per_layer[name] = {
                "target": self.sparsity_of(index, name),
                "sparsity": 1.0 - mask.sum().item() / mask.numel(),
                "shape": list(pruned.shape),
            }

    @staticmethod
    def _check_all_ran(unused: list[str]) -> None:
        if unused:
            raise UsageError(f"{unused[0]} never runs in its block's forward, so it has no statistics; --ignore it")


def prune_layerwise(
    model: nn.Module,
    options: LayerMethod,
    sparsity_of: Callable[[int, str], float],
    inputs: list[BlockInput] | None,
    per_block: list[dict[str, nn.Module]],
    runner: BlockRunner,
    preserve_zeros: bool = False,
    progress: bool = True,
    report: LayerwiseReport | None = None,
    sequential: bool = False,
    offload_dir: Path | None = None,
    min_expert_tokens: int = 0,
    expert_calibration: str = "routed",
) -> LayerwiseReport:
    """Prune every selected linear block by block; `sparsity_of(block_index, name)` gives each target.

    By default the linears of a block are all solved from statistics of the *dense* block (fed by
    the already-pruned earlier blocks); the block's outputs are then recomputed with pruned weights.
    `sequential` solves each linear from the block with its earlier linears already pruned, in one
    forward (see `BlockRunner.run_sequential`). With `offload_dir`, each finished block's weights
    move to disk there and are mapped back lazily (`offload_parameters`), so resident memory holds
    about one block's weights besides the activations, whatever the depth of the model.
    """
    layout = decoder_layout(model)
    report = report or LayerwiseReport()
    if options.needs_data and inputs is None:
        raise UsageError(f"{options.name} needs calibration data; pass --calib DATASET or --calib self")
    last = max(i for i, layers in enumerate(per_block) if layers)
    pruner = _BlockPruner(
        options, sparsity_of, runner, preserve_zeros, sequential, report, min_expert_tokens, expert_calibration
    )
    for i, (block, layers) in enumerate(
        tqdm(list(zip(layout.blocks, per_block))[: last + 1], desc=options.name, unit="block", disable=not progress)
    ):
        started = time.perf_counter()
        home = next(block.parameters()).device
        block.to(runner.device)
        groups = layout.input_groups(layers, f"{layout.prefix}.{i}")
        pruner.prune(i, block, groups, layers, inputs, propagate=i < last)
        block.to(home)
        if offload_dir is not None and layers:
            t = time.perf_counter()
            offload_parameters(block.named_parameters(), offload_dir)
            release_free_heap()
            report.add_time("offload", time.perf_counter() - t)
        report.block_seconds.append(time.perf_counter() - started)
    return report
