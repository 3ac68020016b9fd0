"""Mask-preserving quantization as one call: options (`QuantizeConfig`) in, quantized model and report out.

GPTQ runs through the same layer-by-layer driver as one-shot pruning (calibration capture, the
sequential order, one block on the compute device at a time), so it has the same memory behaviour.
The model keeps float weights, each equal to its code times its scale; `QuantizeResult.scales`
holds the scales an export turns into integer or float8 codes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel

from sparsefit.errors import UsageError
from sparsefit.models.finite import bad_values
from sparsefit.models.layout import decoder_layout, weight_as_out_in
from sparsefit.models.sparsity import block_matrices, measure_sparsity, name_pattern
from sparsefit.pruning.oneshot import CalibrationReport, calibration_batch, describe_calibration, peak_rss_mb, use_bf16
from sparsefit.pruning.pipeline import (
    BlockRunner,
    LayerwiseReport,
    capture_block_inputs,
    prune_layerwise,
    select_block_linears,
)
from sparsefit.quantization.config import SCHEMES, QuantizeConfig
from sparsefit.quantization.methods import QuantizeSink, QuantOptions
from sparsefit.quantization.scheme import Grid

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class QuantizeReport(BaseModel):
    """What quantization did, for the checkpoint's sparsity.json and `--json`."""

    scheme: str
    method: str
    group_size: int | None  # of the weights: None is one scale per output channel
    layers: int
    revived_weights: int  # pruned (zero) weights that quantization made nonzero: always 0, verified per layer
    sparsity_before: float  # over every block matrix (`models.sparsity`), the unquantized ones too
    sparsity_after: float  # kept weights that round to 0 add a little
    # Block matrices left in float, by name pattern: those --targets/--ignore leave out.
    not_quantized: list[str] = []
    # expert matrix -> routed calibration tokens, for those quantized by round-to-nearest for want of tokens
    starved_experts: dict[str, int] = {}
    calibration: CalibrationReport | None
    compute_dtype: str
    phases: dict[str, float]
    seconds: float
    peak_rss_mb: float
    config: QuantizeConfig
    model: str | None = None
    process_peak_rss_mb: float | None = None

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


@dataclass
class QuantizeResult:
    report: QuantizeReport
    scales: dict[str, torch.Tensor]  # layer name -> (out, groups) float32 scales
    grid: Grid


def weight_grid(config: QuantizeConfig) -> Grid:
    kind, bits, _, _ = SCHEMES[config.scheme]
    return Grid(kind, bits, config.weight_group_size)


def _fitting_grid(grid: Grid, per_block: list[dict], explicit: bool) -> Grid:
    """`grid`, or, when its default group size does not divide some layer's input columns (576 in
    SmolLM2), the largest of 64 and 32 that divides them all, with a notice; one scale per output
    channel if neither does. A group size the user chose must fit, or it is an error."""
    if not grid.group_size:
        return grid
    columns = {name: weight_as_out_in(m).shape[1] for layers in per_block for name, m in layers.items()}
    misfit = next(((name, c) for name, c in columns.items() if c % grid.group_size), None)
    if misfit is None:
        return grid
    name, cols = misfit
    if explicit:
        raise UsageError(
            f"{name} has {cols} input columns, not a multiple of --group-size {grid.group_size}; "
            f"pick a divisor of {cols} or 0 (one scale per output channel)"
        )
    size = next((g for g in (64, 32) if all(c % g == 0 for c in columns.values())), None)
    print(
        f"notice: groups of {grid.group_size} do not divide the {cols} input columns of {name}; "
        f"{f'groups of {size}' if size else 'one scale per output channel'} instead (--group-size to choose)",
        file=sys.stderr,
        flush=True,
    )
    return Grid(grid.kind, grid.bits, size)


def _refuse_unquantizable(per_block: list[dict], grid: Grid, scale_dtype: torch.dtype) -> None:
    """A usage error naming the first layer whose weight holds NaN / inf (its scales and codes would
    too), or whose largest weight needs a scale beyond `scale_dtype`'s range (inf there: the layer's
    codes would all be zero). Checked before any layer is touched."""
    limit = torch.finfo(scale_dtype).max
    for layers in per_block:
        for name, module in layers.items():
            weight = weight_as_out_in(module)
            n = bad_values(weight)
            if n:
                raise UsageError(
                    f"{name}.weight holds {n} NaN or infinite values, which cannot be quantized; "
                    "start from a checkpoint with finite weights (this one is damaged, or its fine-tune diverged)"
                )
            amax = float(weight.detach().abs().max()) if weight.numel() else 0.0
            if torch.isinf(torch.tensor(amax / grid.half_range).to(scale_dtype)):
                raise UsageError(
                    f"{name}: weights up to {amax:.4g} need scales beyond {str(scale_dtype).removeprefix('torch.')} "
                    f"(max {limit:.4g}); use --export-dtype bfloat16 or float32"
                )


def quantize(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: QuantizeConfig,
    device: torch.device | str | None = None,
    calib: torch.Tensor | list[torch.Tensor] | None = None,
    progress: bool = True,
) -> QuantizeResult:
    """Quantize the decoder linears of `model` in place as `config` says, every zero weight kept zero.

    `calib` (N, L), or a list of ready batches, overrides the calibration data the config names.
    """
    from sparsefit.models.row_deltas import refuse_row_deltas
    from sparsefit.models.slorb import slorb_modules

    if slorb_modules(model):
        raise UsageError(
            "the model has SLoRB branches, which quantized exports cannot carry: first `sparsefit export "
            "--slorb merge` (dense) or `--slorb drop` (N:M alone), then quantize that"
        )
    refuse_row_deltas(model, "quantize")
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    layout = decoder_layout(model)
    # Each expert's slice of a fused expert tensor is quantized as a linear of its own (routers stay float).
    per_block = select_block_linears(layout, config.targets, config.ignore)
    grid = _fitting_grid(weight_grid(config), per_block, explicit="group_size" in config.model_fields_set)
    _refuse_unquantizable(per_block, grid, getattr(torch, config.export_dtype))
    quantized = {name for layers in per_block for name in layers}
    not_quantized = sorted(
        {
            name_pattern(m.name)
            for m in block_matrices(model)[0]
            if m.name not in quantized and f"{m.name}.0" not in quantized  # a fused tensor by its first expert
        }
    )
    sparsity_before = measure_sparsity(model)["overall"]  # over every block matrix, experts included

    report = LayerwiseReport()
    t = time.perf_counter()
    source = None
    if calib is None and config.method == "gptq":
        calib, source = calibration_batch(model, tokenizer, config, progress)
    report.add_time("calibration_data", time.perf_counter() - t)
    sink = QuantizeSink()
    scale_dtype = getattr(torch, config.export_dtype)  # one of three literal names, never free text
    options = QuantOptions(config.method, grid, sink, config.block_size, config.damp, scale_dtype,
                           actorder=config.actorder, observer=config.observer)  # fmt: skip
    runner = BlockRunner(device, use_bf16(config.compute_dtype, device))
    inputs = None
    if options.needs_data:
        t = time.perf_counter()
        inputs = capture_block_inputs(model, layout, calib, config.batch_size, device)
        report.add_time("capture", time.perf_counter() - t)
    prune_layerwise(
        model, options, lambda block, name: 0.0, inputs, per_block, runner, preserve_zeros=True,
        progress=progress, report=report, sequential=config.sequential, min_expert_tokens=config.min_expert_tokens,
    )  # fmt: skip
    quant_report = QuantizeReport(
        scheme=config.scheme,
        method=config.method,
        group_size=grid.group_size,
        layers=len(sink.scales),
        revived_weights=sum(sink.revived.values()),
        sparsity_before=sparsity_before,
        sparsity_after=measure_sparsity(model)["overall"],
        not_quantized=not_quantized,
        starved_experts=report.starved_experts,
        calibration=None if calib is None else describe_calibration(calib, source),
        compute_dtype="bfloat16" if runner.bf16 else "float32",
        phases=report.phases,
        seconds=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
        config=config,
    )
    return QuantizeResult(quant_report, sink.scales, grid)
