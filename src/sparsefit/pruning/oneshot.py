"""One-shot pruning as one call: options (`OneShotConfig`) in, pruned model and report out."""

from __future__ import annotations

import re
import resource
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel

from sparsefit.config import LayerwiseOptions
from sparsefit.errors import SparsefitError, UsageError
from sparsefit.models.layout import decoder_layout, params_outside_blocks, selected, weight_as_out_in
from sparsefit.models.offload import offload_parameters, on_ram_filesystem, prepare_offload_dir
from sparsefit.models.sparsity import block_matrices, dense_patterns, measure_sparsity, name_pattern
from sparsefit.pruning.config import OneShotConfig
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


class SparsityReport(BaseModel):
    """Measured on the pruned weights over every weight matrix of the decoder blocks (`models.sparsity`)."""

    overall: float  # zeros / weights over every block matrix, pruned or not
    weights: int  # how many weights `overall` counts
    measured_over: str
    pruned: float  # zeros / weights over the matrices this run pruned
    per_layer: dict[str, float]  # by matrix (a fused expert tensor as a whole)
    per_expert: dict[str, list[float]]  # fused expert tensors: one figure per expert
    per_kind: dict[str, dict[str, float]]  # kind (name inside a block) -> sparsity, weights
    excluded: dict[str, str]  # what is not counted, by name pattern, and why
    per_block: list[float]  # each block's target
    # expert matrix -> routed calibration tokens, for those pruned by magnitude for want of tokens
    starved_experts: dict[str, int] = {}


class CalibrationReport(BaseModel):
    source: str | None  # the config's `calib` ("+self" with self_mix), or None for batches passed in
    sequences: int
    tokens: int


class OneShotReport(BaseModel):
    """What one-shot pruning did, for the checkpoint's sparsity.json and `--json`."""

    method: str
    structure: str
    profile: str | dict[str, float]
    target: float
    sparsity: SparsityReport
    owl_outlier_ratios: list[float] | None
    calibration: CalibrationReport | None
    compute_dtype: str  # of the block forwards: "bfloat16" or "float32"
    low_memory: bool  # whether finished blocks and paused activations went to files (`offload_dir`)
    phases: dict[str, float]  # seconds per phase
    block_seconds: list[float] = []  # wall time of each pruned block (statistics, solves, offload)
    seconds: float
    peak_rss_mb: float  # of the process during pruning
    # On a GPU: the most the pruning held there at once (embeddings and head, one block, its
    # statistics, the batches in flight).
    peak_gpu_mb: float | None
    config: OneShotConfig
    model: str | None = None  # the model spec, set by the caller that loaded it
    process_peak_rss_mb: float | None = None  # with loading and the save, set by the command line

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); otherwise bf16 is emulated and slow.

    torch's kernels limited below AVX-512 (ATEN_CPU_CAPABILITY=avx2) count as no native bf16.
    """
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX2"):
        return False
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
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: LayerwiseOptions, progress: bool = True
) -> tuple[torch.Tensor | None, str | None]:
    """The (N, L) token ids the config asks for (None when it names none) and their source.

    `self_mix` sequences sampled from the model follow the dataset's. When the default dataset is out
    of reach (no SPARSEFIT_DATA_DIR copy, no hub), all the text comes from the model itself (`self`),
    with a notice; a dataset the user named fails instead, with a one-line fix.
    """
    from sparsefit.data.calibration import sample_calibration
    from sparsefit.data.self_generated import sample_from_model
    from sparsefit.data.sources import load_texts

    if config.calib is None:
        return None, None
    source = config.calib
    if source != "self":
        try:
            texts = load_texts(source, config.calib_split, config.text_field)
            calib = sample_calibration(tokenizer, texts, config.num_samples, config.seq_len, config.seed)
        except UsageError as err:
            if "calib" in config.model_fields_set:
                raise UsageError(f"{err}; or calibrate on text the model writes: --calib self") from None
            print(
                f"notice: the default calibration data ({source}) is out of reach, so the calibration text is "
                f"sampled from the model (--calib self); set SPARSEFIT_DATA_DIR or --calib to use a dataset",
                file=sys.stderr,
                flush=True,
            )
            source = "self"
        else:
            if config.self_mix:
                mix = sample_from_model(
                    model, tokenizer, config.self_mix, config.seq_len, config.seed, progress=progress
                )
                calib, source = torch.cat([calib, mix.cpu()]), f"{source}+self"
            return calib, source
    num = config.num_samples + config.self_mix
    return sample_from_model(model, tokenizer, num, config.seq_len, config.seed, progress=progress), source


def describe_calibration(calib: torch.Tensor | list[torch.Tensor], source: str | None) -> CalibrationReport:
    batches = [calib] if isinstance(calib, torch.Tensor) else calib
    return CalibrationReport(
        source=source, sequences=sum(b.shape[0] for b in batches), tokens=sum(b.numel() for b in batches)
    )


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo: what the kernel can give without swapping (None if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _auto_offload_dir(calib: torch.Tensor | list[torch.Tensor], per_block: list[dict], sequential: bool) -> Path | None:
    """Where `offload_dir: auto` offloads: a fresh temporary folder when the system's temp directory is
    on a disk with room for the pruned weights; otherwise (on a RAM filesystem files cost memory too)
    only when pruning would not fit in memory (`_low_memory_dir`). None: nothing is offloaded."""
    temp = tempfile.gettempdir()
    weights = sum(m.weight.numel() * m.weight.element_size() for layers in per_block for m in layers.values())
    if not on_ram_filesystem(temp) and shutil.disk_usage(temp).free > 2 * weights:  # the weights, with room to spare
        return Path(tempfile.mkdtemp(prefix="sparsefit-offload-"))
    return _low_memory_dir(calib, per_block, sequential)


def _low_memory_dir(calib: torch.Tensor | list[torch.Tensor], per_block: list[dict], sequential: bool) -> Path | None:
    """A temporary offload directory when pruning would not fit in memory otherwise, else None.

    Beyond the loaded model, pruning holds the calibration activations in float32 (with the
    sequential order, every batch's widest linear input at a stop, twice over for its transients)
    and a few copies of one block's weights. When that exceeds 80% of the available memory, low-memory
    mode engages, with a notice.
    """
    available = available_memory_bytes()
    layers = next(layers for layers in per_block if layers)
    tokens = describe_calibration(calib, None).tokens
    hidden = min(weight_as_out_in(m).shape[1] for m in layers.values())
    widest = max(weight_as_out_in(m).shape[1] for m in layers.values())
    need = tokens * (hidden + (2 * widest if sequential else 0)) * 4
    need += 3 * sum(m.weight.numel() * 4 for m in layers.values())
    if available is None or need <= 0.8 * available:
        return None
    directory = Path(tempfile.mkdtemp(prefix="sparsefit-offload-"))
    print(
        f"notice: pruning needs about {need / 2**30:.1f} GiB beyond the model and {available / 2**30:.1f} GiB is "
        f"available: low-memory mode engages (as --offload-dir {directory})",
        file=sys.stderr,
        flush=True,
    )
    return directory


def _check_structure(per_block: list[dict], structure: Structure) -> None:
    if not structure.is_nm:
        return
    for layers in per_block:
        for name, module in layers.items():
            structure.check_columns(weight_as_out_in(module).shape[1], name)


def check_coverage(
    model: torch.nn.Module, per_block: list[dict], targets: list[str] | None, ignore: list[str] | None
) -> None:
    """Refuse, before any work, to leave a block matrix dense that the user did not exclude: one no
    layout rule can prune (a module type or tensor layout sparsefit does not know) would make the
    sparsity overstate what was pruned. Small matrices (`models.sparsity.SMALL_SIDE`) pass."""
    names = {name for layers in per_block for name in layers}
    missed: dict[str, tuple] = {}
    for m in block_matrices(model)[0]:
        covered = m.name in names or f"{m.name}.0" in names
        if covered or m.small or not selected(m.name, targets, ignore):
            continue
        missed.setdefault(name_pattern(m.name), (type(m.tensor).__name__, tuple(m.tensor.shape)))
    if missed:
        listed = ", ".join(f"{p} (shape {s})" for p, (_, s) in missed.items())
        leaf = next(iter(missed)).rsplit(".", 1)[-1]
        raise UsageError(
            f"sparsefit cannot prune these block matrices in this layout, and they would stay dense: {listed}; "
            f"keep them dense on purpose with --ignore (e.g. --ignore '{leaf}'; still counted in the sparsity)"
        )


def oneshot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: OneShotConfig,
    device: torch.device | str | None = None,
    calib: torch.Tensor | list[torch.Tensor] | None = None,
    progress: bool = True,
) -> OneShotReport:
    """Prune `model` in place as `config` says; returns the report (sparsity per layer, phase times).

    `calib` (N, L), or a list of ready batches, overrides the calibration data the config names.
    """
    from sparsefit.models.row_deltas import refuse_row_deltas

    refuse_row_deltas(model, "pruning")  # a delta's mask would keep newly pruned weights alive
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the report's GPU peak is the pruning's own
    structure = Structure.parse(config.structure)
    layout = decoder_layout(model)
    per_block = select_block_linears(layout, config.targets, config.ignore)
    check_coverage(model, per_block, config.targets, config.ignore)
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
    explicit_dir = config.offload_dir not in (None, "auto")
    offload_dir = prepare_offload_dir(config.offload_dir) if explicit_dir else None

    t = time.perf_counter()
    source = None  # batches passed in
    if calib is None and (config.method != "magnitude" or config.profile == "owl"):
        calib, source = calibration_batch(model, tokenizer, config, progress)
    report.add_time("calibration_data", time.perf_counter() - t)
    with ExitStack() as cleanup:
        if config.offload_dir == "auto" and calib is not None:
            offload_dir = _auto_offload_dir(calib, per_block, config.sequential)
            if offload_dir is not None:  # ours: removed at the end (each file was unlinked once mapped)
                cleanup.callback(shutil.rmtree, offload_dir, ignore_errors=True)
        # N:M groups must not straddle SparseGPT's column blocks: round the block down to a multiple of M.
        block_size = (
            max(structure.m, config.block_size - config.block_size % structure.m)
            if structure.is_nm
            else config.block_size
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
            inputs = (
                capture_block_inputs(model, layout, calib, config.batch_size, device) if options.needs_data else None
            )
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
            sequential=config.sequential, offload_dir=offload_dir, min_expert_tokens=config.min_expert_tokens,
            expert_calibration=config.expert_calibration,
        )  # fmt: skip

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # queued kernels belong to this call's time
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in report.per_layer.values())
    numel = sum(r["shape"][0] * r["shape"][1] for r in report.per_layer.values())
    measured = measure_sparsity(model)
    if config.target_sparsity >= 0.02:  # behind `check_coverage`, a check of what pruning did

        def deliberate(name: str) -> bool:  # excluded by the user, or given a (near) zero target
            low = any(re.search(p, name) and s < 0.02 for p, s in explicit.items())
            return low or not selected(name, config.targets, config.ignore)

        left = dense_patterns(model, deliberate, measured)
        if left:
            raise SparsefitError(f"pruning left block matrices dense: {', '.join(left)}; please report this")
    return OneShotReport(
        method=config.method,
        structure=str(structure),
        profile=config.profile,
        target=config.target_sparsity,
        sparsity=SparsityReport(
            overall=measured["overall"],
            weights=measured["weights"],
            measured_over=measured["measured_over"],
            pruned=zeros / numel,
            per_layer=measured["per_layer"],
            per_expert=measured["per_expert"],
            per_kind=measured["per_kind"],
            excluded=measured["excluded"],
            per_block=block_sparsity,
            starved_experts=report.starved_experts,
        ),
        owl_outlier_ratios=owl_ratios,
        calibration=None if calib is None else describe_calibration(calib, source),
        compute_dtype="bfloat16" if runner.bf16 else "float32",
        low_memory=offload_dir is not None,
        phases=report.phases,
        block_seconds=report.block_seconds,
        seconds=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
        peak_gpu_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        config=config,
    )
