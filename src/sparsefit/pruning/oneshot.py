"""One-shot pruning as one call: options in, pruned model and report out."""

from __future__ import annotations

import re
import resource
import time
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparsefit.config import check_regexes
from sparsefit.errors import UsageError
from sparsefit.models.layout import decoder_layout, params_outside_blocks, weight_as_out_in
from sparsefit.models.offload import offload_parameters, prepare_offload_dir
from sparsefit.pruning.methods import MethodOptions
from sparsefit.pruning.owl import owl_sparsities
from sparsefit.pruning.pipeline import (
    BlockRunner,
    LayerwiseReport,
    capture_block_inputs,
    owl_outlier_ratios,
    prune_layerwise,
    select_block_linears,
)
from sparsefit.pruning.structure import Structure

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def preset_settings(preset: str, method: str) -> dict:
    """The fields a preset sets, unless they are given explicitly.

    "best": what measured best on perplexity and time (benchmarks/README.md): the sequential order
    and, for SparseGPT, a 4-step least-squares refit of the kept weights. "paper": each paper's own
    procedure (SparseGPT, Wanda: every linear of a block from the dense block's statistics, no refit).
    """
    if preset == "paper":
        return {"sequential": False, "reconstruct_iters": 0}
    return {"sequential": True, "reconstruct_iters": 4 if method == "sparsegpt" else 0}


class OneShotConfig(BaseModel):
    """Every option of one-shot pruning, with its default; validated on construction."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf / nan in any float field is an error

    # Fills `sequential` and `reconstruct_iters` where they are not given (`preset_settings`).
    preset: Literal["best", "paper"] = "best"
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    structure: str = "unstructured"  # "unstructured" or "N:M" (keep N of every M)
    profile: Literal["uniform", "owl"] | dict[str, float] = "uniform"  # dict: layer regex -> sparsity
    owl_m: float = Field(5.0, gt=0)
    owl_lambda: float = Field(0.08, ge=0, lt=1)
    targets: list[str] | None = None  # regexes over module names; default: every linear in the blocks
    ignore: list[str] = []
    calib: str | None = "gsm8k"  # dataset spec, "self" (sampled from the model), or None (magnitude only)
    calib_split: str = "train"
    text_field: str = "text"
    num_samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=2)
    seed: int = Field(0, ge=0, lt=2**32)  # torch, random and numpy all take it
    batch_size: int = Field(4, ge=1)  # sequences per block forward: 4 x 512 keeps transients small
    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0)
    magnitude_scope: Literal["layer", "row"] = "layer"
    # After each mask is chosen, this many conjugate-gradient steps refit the kept weights to the
    # dense layer's outputs (least squares on the calibration inputs); 0 keeps the method's own weights.
    # Default: the preset's (4 with SparseGPT under "best", else 0).
    reconstruct_iters: int = Field(4, ge=0)
    preserve_mask: bool = False  # keep existing zeros pruned (iterative pruning)
    # Prune each linear from the block with its earlier linears already pruned, in one forward per
    # block instead of two (the GPTQ reference code's --true-sequential); off: every linear sees the
    # dense block. Default: the preset's (on under "best").
    sequential: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # block forwards; statistics stay float32
    # Low-memory mode: each pruned block's weights move to a file here, mapped back lazily, as do the
    # MLP intermediates that paused sequential forwards wait with; freed heap goes back to the OS
    # after each block. Resident memory then holds about one block's weights plus the activations.
    # None keeps everything in memory.
    offload_dir: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: object) -> object:
        if not isinstance(data, dict) or data.get("preset", "best") not in ("best", "paper"):
            return data  # the field validators name what is wrong
        method = data.get("method", "sparsegpt")
        settings = preset_settings(data.get("preset", "best"), method)
        if method == "magnitude":
            settings["reconstruct_iters"] = 0  # it has no calibration statistics to refit with
        return {**settings, **data}

    @field_validator("structure")
    @classmethod
    def _structure(cls, v: str) -> str:
        return str(Structure.parse(v))

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes(cls, v: list[str] | None) -> list[str] | None:
        return check_regexes(v)

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str | dict[str, float]) -> str | dict[str, float]:
        if isinstance(v, dict):
            check_regexes(list(v))
            for key, s in v.items():
                if not 0.0 <= s < 1.0:
                    raise ValueError(f"sparsity {s} for '{key}' must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> OneShotConfig:
        nm = Structure.parse(self.structure)
        if nm.is_nm and self.profile != "uniform":
            raise ValueError("N:M structure fixes the sparsity of every layer; use profile 'uniform'")
        if self.method != "magnitude" and self.calib is None:
            raise ValueError(f"method '{self.method}' needs calibration data: set calib to a dataset or 'self'")
        if self.reconstruct_iters and self.method == "magnitude":
            raise ValueError("reconstruct_iters needs calibration statistics: use method 'wanda' or 'sparsegpt'")
        if self.profile == "owl" and self.calib is None:
            raise ValueError("profile 'owl' needs calibration data (Wanda scores): set calib")
        return self

    @property
    def target_sparsity(self) -> float:
        nm = Structure.parse(self.structure)
        return nm.sparsity if nm.is_nm else self.sparsity


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); otherwise bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(compute_dtype: str, device: torch.device) -> bool:
    if compute_dtype != "auto":
        return compute_dtype == "bfloat16"
    # On GPUs bf16 block forwards gained nothing for small models (the pruning is bound by kernel
    # launches) and cost two-pass SparseGPT 2:4 perplexity: GPUs keep float32 (benchmarks/oneshot.py).
    return device.type == "cpu" and cpu_has_bf16()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: OneShotConfig, progress: bool = True
) -> torch.Tensor | None:
    """The (N, L) token ids the config asks for, or None when the method needs none."""
    from sparsefit.data.calibration import sample_calibration
    from sparsefit.data.self_generated import sample_from_model
    from sparsefit.data.sources import load_texts

    if config.calib is None or (config.method == "magnitude" and config.profile != "owl"):
        return None
    if config.calib == "self":
        return sample_from_model(model, tokenizer, config.num_samples, config.seq_len, config.seed, progress=progress)
    texts = load_texts(config.calib, config.calib_split, config.text_field)
    return sample_calibration(tokenizer, texts, config.num_samples, config.seq_len, config.seed)


def _describe(calib: torch.Tensor | list[torch.Tensor], source: str | None) -> dict:
    batches = [calib] if isinstance(calib, torch.Tensor) else calib
    return {"source": source, "sequences": sum(b.shape[0] for b in batches), "tokens": sum(b.numel() for b in batches)}


def _check_structure(per_block: list[dict], structure: Structure) -> None:
    if not structure.is_nm:
        return
    for layers in per_block:
        for name, module in layers.items():
            structure.check_columns(weight_as_out_in(module).shape[1], name)


def oneshot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: OneShotConfig,
    device: torch.device | str | None = None,
    calib: torch.Tensor | list[torch.Tensor] | None = None,
    progress: bool = True,
) -> dict:
    """Prune `model` in place as `config` says; returns the report (sparsity per layer, phase times).

    `calib` (N, L), or a list of ready batches, overrides the calibration data the config names.
    """
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the report's GPU peak is the pruning's own
    structure = Structure.parse(config.structure)
    layout = decoder_layout(model)
    per_block = select_block_linears(layout, config.targets, config.ignore)
    try:
        _check_structure(per_block, structure)
    except ValueError as err:  # the math raises ValueError; at this boundary it is the user's input
        raise UsageError(str(err)) from None
    names = [name for layers in per_block for name in layers]
    for pattern in config.profile if isinstance(config.profile, dict) else {}:
        if not any(re.search(pattern, name) for name in names):
            raise UsageError(
                f"profile pattern '{pattern}' matches no layer to prune (names look like '{names[0]}'); fix the pattern"
            )
    report = LayerwiseReport()
    # Checked before any work: an unwritable directory should not cost the calibration pass.
    offload_dir = None if config.offload_dir is None else prepare_offload_dir(config.offload_dir)

    t = time.perf_counter()
    if calib is None:
        calib = calibration_batch(model, tokenizer, config, progress)
    report.add_time("calibration_data", time.perf_counter() - t)
    # N:M groups must not straddle SparseGPT's column blocks: round the block down to a multiple of M.
    block_size = (
        max(structure.m, config.block_size - config.block_size % structure.m) if structure.is_nm else config.block_size
    )
    options = MethodOptions(
        config.method, structure, block_size, config.damp, config.magnitude_scope, config.reconstruct_iters
    )
    runner = BlockRunner(device, use_bf16(config.compute_dtype, device), offload_dir=offload_dir)

    inputs = None
    if calib is not None:
        t = time.perf_counter()
        inputs = capture_block_inputs(model, layout, calib, config.batch_size, device)
        report.add_time("capture", time.perf_counter() - t)

    block_sparsity = [config.target_sparsity] * len(layout.blocks)
    owl_ratios = None
    if config.profile == "owl":
        t = time.perf_counter()
        owl_ratios = owl_outlier_ratios(layout, per_block, inputs, runner, config.owl_m, progress)
        # The OWL pass consumed the inputs; capturing again is cheaper than keeping a copy.
        inputs = capture_block_inputs(model, layout, calib, config.batch_size, device) if options.needs_data else None
        active = [i for i, layers in enumerate(per_block) if layers]
        try:
            profile = owl_sparsities([owl_ratios[i] for i in active], config.sparsity, config.owl_lambda)
        except ValueError as err:
            raise UsageError(str(err)) from None
        for i, s in zip(active, profile):
            block_sparsity[i] = s
        report.add_time("owl", time.perf_counter() - t)
    explicit = config.profile if isinstance(config.profile, dict) else {}

    def sparsity_of(block: int, name: str) -> float:
        for pattern, s in explicit.items():
            if re.search(pattern, name):
                return s
        return block_sparsity[block]

    if not options.needs_data:
        inputs = None  # magnitude: data, if any, served only OWL's outlier ratios
    if offload_dir is not None:  # captured: embeddings and head wait on disk until the model is used whole
        t = time.perf_counter()
        offload_parameters(params_outside_blocks(model, layout), offload_dir)
        report.add_time("offload", time.perf_counter() - t)
    prune_layerwise(
        model, options, sparsity_of, inputs, per_block, runner, config.preserve_mask, progress, report,
        sequential=config.sequential, offload_dir=offload_dir,
    )  # fmt: skip

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # queued kernels belong to this call's time
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in report.per_layer.values())
    numel = sum(r["shape"][0] * r["shape"][1] for r in report.per_layer.values())
    return {
        "method": config.method,
        "structure": str(structure),
        "profile": config.profile,
        "target": config.target_sparsity,
        "sparsity": {
            "overall": zeros / numel,
            "per_layer": {name: r["sparsity"] for name, r in report.per_layer.items()},
            "per_block": block_sparsity,
        },
        "owl_outlier_ratios": owl_ratios,
        "calibration": None if calib is None else _describe(calib, config.calib),
        "compute_dtype": "bfloat16" if runner.bf16 else "float32",
        "phases": report.phases,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        # On a GPU: the most the pruning held there at once (embeddings and head, one block, its
        # statistics, the batches in flight).
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "config": config.model_dump(),
    }
