"""Adapters in the fine-tuning loop: set up before the optimizer (freeze the base, optionally store it
in 4 bits, choose rows, attach row deltas or LoRA) and finished after the last step (dequantize the
base, merge as configured). The loop itself is unchanged: only the adapters' parameters require
gradients, so they are all the optimizer, DDP and the checkpoints' optimizer state see.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsefit.errors import UsageError
from sparsefit.models.row_deltas import attach_row_deltas, merge_row_deltas, row_delta_info
from sparsefit.training.adapters.lora import attach_lora, merge_lora
from sparsefit.training.adapters.quantized import base_bytes, dequantize_base, quantize_base_
from sparsefit.training.adapters.select import choose_rows, row_scores
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.losses import HeadPath, task_loss
from sparsefit.training.masks import SparsityMasks, decoder_linears


@dataclass
class Adapters:
    """What `setup_adapters` did, for the metrics and `finish_adapters`."""

    kind: str  # rows | lora
    trainable: int
    layers: int
    base_bits: int
    base_bytes: int  # the frozen base's parameters and buffers as stored (packed codes in 4 bits)
    selection: dict = field(default_factory=dict)  # rows: criterion, rows per layer, seconds

    def metrics(self) -> dict:
        return {
            "peft": self.kind,
            "trainable_parameters": self.trainable,
            "adapter_layers": self.layers,
            "base_bits": self.base_bits,
            "base_bytes": self.base_bytes,
            **self.selection,
        }


def _out_in(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    return mask.t() if isinstance(module, Conv1D) else mask  # masks follow module.weight; rows want (out, in)


def setup_adapters(
    model: nn.Module,
    config: FinetuneConfig,
    masks: SparsityMasks | None,
    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    bf16: bool,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rows: dict[str, torch.Tensor] | None = None,
) -> Adapters:
    """Freeze `model` and give its decoder linears adapters as `config.peft` / `config.adapter` say.

    `batches(n)` yields the first n micro-batches of this process's training data (for the data-driven
    criteria); `reduce` sums a tensor over processes, so every rank chooses the same rows. `rows`
    (a resumed run's, from its checkpoint) replaces the choice.
    """
    options = config.adapter
    linears = decoder_linears(model, None, options.exclude)  # a UsageError when nothing matches
    for p in model.parameters():
        p.requires_grad_(False)
    keep = None
    if masks is not None and masks.sparsity() > 0:
        keep = {name: _out_in(masks.modules[name], masks.masks[name]) for name in linears if name in masks.masks}
    selection: dict = {}
    if config.peft == "rows" and rows is not None:
        unknown = sorted(set(rows) - set(linears))
        if unknown:
            raise UsageError(f"the checkpoint's row adapters name layers this run does not target ({unknown[0]})")
        selection = {"criterion": options.criterion, "rows": sum(len(r) for r in rows.values()), "restored": True}
        selection["rows_per_layer"] = {name: len(r) for name, r in rows.items()}
    elif config.peft == "rows":
        t = time.perf_counter()
        count = {"taylor": options.importance_batches, "zo-taylor": options.zo_directions}.get(options.criterion, 0)
        autocast = (lambda: torch.autocast(_device(model).type, dtype=torch.bfloat16)) if bf16 else nullcontext

        data = list(batches(count)) if count else []
        path = HeadPath.detect(model, data[0]) if data else HeadPath(False)

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with autocast():
                return task_loss(model, batch, path)

        was_training = model.training
        model.eval()  # no dropout while scoring
        try:
            scores = row_scores(
                linears, options.criterion, loss_fn, data, config.seed, options.zo_directions, options.zo_eps, reduce
            )
        finally:
            model.train(was_training)
        rows = choose_rows(
            scores,
            rank=None if options.row_fraction is not None else options.rank,
            fraction=options.row_fraction,
            budget=options.row_budget,
        )
        selection = {
            "criterion": options.criterion,
            "rows": sum(len(r) for r in rows.values()),
            "rows_per_layer": {name: len(r) for name, r in rows.items()},
            "selection_seconds": time.perf_counter() - t,
        }
    residuals = None
    if options.base_bits == 4:
        try:
            residuals = quantize_base_(linears, options.base_group_size)
        except ValueError as err:  # e.g. a group size that does not divide a layer's inputs
            raise UsageError(f"{err}; pass a --base-group-size that divides every layer's inputs") from None
    if config.peft == "rows":
        init = None
        if residuals is not None and options.residual_init:
            init = {name: residuals[name][r.to(residuals[name].device)] for name, r in rows.items()}
            if keep is not None:  # pruned weights quantize to exact zeros: their residual is 0 already
                init = {name: d * keep[name][rows[name]] if name in keep else d for name, d in init.items()}
        trainable = attach_row_deltas({n: linears[n] for n in rows}, rows, keep, options.dropout, init)
        layers = len(rows)
    else:
        alpha = options.lora_alpha if options.lora_alpha is not None else 2.0 * options.rank
        trainable = attach_lora(linears, model, options.rank, alpha, options.dropout)
        layers = len(linears)
    if not trainable:
        raise UsageError("the adapters have no parameters: check --exclude and --rank")
    stored = base_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return Adapters(config.peft, trainable, layers, options.base_bits, stored, selection)


def finish_adapters(model: nn.Module, config: FinetuneConfig, masks: SparsityMasks | None) -> dict:
    """After the last step: the base back in float (from 4 bits), then the merge `config.adapter.merge` asks for."""
    merge = config.adapter.merge
    dequantized = dequantize_base(model)
    info: dict = {"merge": merge, "dequantized_layers": dequantized}
    if config.peft == "rows":
        if merge != "none":
            info["merged_layers"] = merge_row_deltas(model)  # masked by construction: revives nothing
        else:
            info["row_adapters"] = row_delta_info(model)
        return info
    keep = {masks.modules[n]: masks.masks[n] for n in masks.masks} if masks is not None else None
    info.update(merge_lora(model, keep, masked=merge == "masked"))
    return info


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
