"""The fine-tuning loop: one loop for dense fine-tuning, sparse (mask-preserving) fine-tuning,
distillation from a dense teacher and gradual pruning, on one device or many (DDP or FSDP).

Per step: (GMP mask update) -> micro-batches: forward, losses, backward -> zero pruned grads ->
gradient norm (clipped when max_grad_norm > 0) -> AdamW step -> re-apply masks -> log ->
checkpoint when one is due or a stop signal arrived. With method `ast` (`training.adaptive`) the
weights stay dense: the masks are recomputed every few steps, the forward sees W * M, pruned
weights get the straight-through gradient plus SR-STE's decay, and W *= M once at the end.
Masks, losses, schedules and checkpoints are library pieces; this file only orders them.

The output folder holds `train_log.jsonl` and `checkpoints/step-N/` while training; at the end
one atomic exchange puts the final HF checkpoint (with `sparsity.json`, `metrics.json` and the
log) in its place, and the checkpoints go with the old folder.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from sparsefit.atomic import clean_stale_in, discard_dir, foreign_entries, is_empty_dir, make_dir, mark, read_marker
from sparsefit.errors import Interrupted, SparsefitError, UsageError
from sparsefit.models.layout import decoder_layout
from sparsefit.models.row_deltas import refuse_row_deltas
from sparsefit.models.slorb import slorb_info
from sparsefit.outputs import claim_output
from sparsefit.pruning.magnitude import prune_magnitude
from sparsefit.pruning.oneshot import peak_rss_mb
from sparsefit.training.adapters.finetune import Adapters, finish_adapters, setup_adapters
from sparsefit.training.adaptive import AdaptiveMasks, input_sq_sums, setup_adaptive
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.data import collate, example_order, load_examples, token_examples
from sparsefit.training.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from sparsefit.training.log import TrainLog
from sparsefit.training.losses import HeadPath, compute_losses
from sparsefit.training.masks import SparsityMasks, decoder_linears
from sparsefit.training.schedules import gmp_sparsity, lr_factor
from sparsefit.training.sharding import filled, full, local, meta_copy, model_state, shard_model
from sparsefit.training.signals import StopRequest
from sparsefit.training.state import (
    checkpoint_dir,
    find_checkpoint,
    load_training_state,
    published_steps,
    read_trainer_state,
    save_training_state,
)
from sparsefit.training.teacher import check_compatible, freeze, load_teacher

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHECKPOINTS_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"
METRICS_FILE = "metrics.json"
# Options that change neither the trajectory nor the result: a resumed run may change them.
BOOKKEEPING = {"checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "log_every"}


def _bf16(config: FinetuneConfig, device: torch.device) -> bool:
    from sparsefit.pruning.oneshot import cpu_has_bf16

    if config.bf16 != "auto":
        return config.bf16 == "true"
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()


def total_steps(config: FinetuneConfig, num_examples: int, mean_tokens: float, global_batch: int) -> int:
    """Steps the run takes: max_steps, or epochs of whole batches, or a token budget (default one epoch)."""
    if config.max_steps is not None:
        return config.max_steps
    if config.max_tokens is not None:
        return max(1, math.ceil(config.max_tokens / (global_batch * mean_tokens)))
    epochs = config.num_epochs if config.num_epochs is not None else 1.0
    return max(1, math.ceil(epochs * (num_examples // global_batch)))


def resolve_masks(model: PreTrainedModel, config: FinetuneConfig) -> SparsityMasks | None:
    if config.masks == "none":
        return None
    masks = SparsityMasks.from_zeros(model, config.targets, config.ignore)  # no match: a UsageError
    # auto: a dense model has (almost) no exact zeros; a pruned one has many
    if config.masks == "auto" and config.gmp is None and masks.sparsity() < 0.01:
        return None
    return masks


@torch.no_grad()
def gmp_update(masks: SparsityMasks, sparsity: float, optimizer: torch.optim.Optimizer) -> None:
    """Prune every masked linear to `sparsity` by magnitude, keeping earlier zeros pruned."""
    for name, module, mask in masks.items():
        transposed = isinstance(module, Conv1D)  # masks follow module.weight; the math wants (out, in)
        weight, mask = full(module.weight.detach()), full(mask)  # under FSDP: the layer's threshold needs all of it
        if transposed:
            weight, mask = weight.t(), mask.t()
        _, keep = prune_magnitude(weight, sparsity, preserve_mask=mask)
        masks.set(name, keep.t().contiguous() if transposed else keep)
    masks.apply_to_weights()
    masks.apply_to_optimizer(optimizer)


def _spec(name: str | None) -> str | None:
    """A model spec as one string for every spelling of a local path (./m and /abs/m are one model)."""
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def options_fingerprint(model_name: str, config: FinetuneConfig, world: int) -> dict:
    """The options a resumed run must share with the run that wrote the checkpoint: the model spec,
    the data, the optimizer, the schedule, the masks and losses (all but the bookkeeping ones) and
    the number of processes."""
    fields = config.model_dump(mode="json", exclude=BOOKKEEPING)
    return {**fields, "model": _spec(model_name), "teacher": _spec(fields["teacher"]), "world_size": world}


def run_fingerprint(model: PreTrainedModel, config: FinetuneConfig, world: int, masks: SparsityMasks | None) -> dict:
    """`options_fingerprint` plus what the loaded model is: its size and its starting sparsity."""
    return {
        **options_fingerprint(str(model.config.name_or_path), config, world),
        "parameters": sum(p.numel() for p in model.parameters()),
        "initial_sparsity": round(masks.sparsity(), 6) if masks is not None else None,
    }


def fingerprint_changes(saved: dict | None, current: dict) -> list[str]:
    """`field (old -> new)` for every difference; a checkpoint without a fingerprint differs in everything."""
    if saved is None:
        return ["(the checkpoint records no configuration)"]
    keys = sorted(set(saved) | set(current))
    return [f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]


def finished_run(output_dir: str | Path) -> dict | None:
    """The metrics of a fine-tune that completed in `output_dir` and left nothing to resume (None otherwise)."""
    if (Path(output_dir) / CHECKPOINTS_DIR).exists():
        return None
    try:
        metrics = json.loads((Path(output_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("completed") else None


@dataclass
class _Run:
    """What the loop needs, set up once (`_setup`)."""

    info: DistInfo
    device: torch.device
    bf16: bool
    fsdp: bool
    masks: SparsityMasks | None
    teacher: PreTrainedModel | None
    examples: list
    lengths: list[int]
    steps: int
    layers: list[int]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_model: torch.nn.Module
    student_path: HeadPath
    teacher_path: HeadPath | None
    pad_id: int
    adaptive: AdaptiveMasks | None = None
    adapters: Adapters | None = None
    skeleton: torch.nn.Module | None = None  # FSDP with adapters: the model's structure, to merge on rank 0
    fingerprint: dict = field(default_factory=dict)
    checkpoint_seconds: float = 0.0
    checkpoints: int = 0


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig,
    output_dir: str | Path,
    teacher: PreTrainedModel | None = None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    self_text: torch.Tensor | None = None,
) -> dict:
    """Train `model` in place as `config` says; write the final checkpoint, log and metrics into `output_dir`.

    `teacher` (already loaded) overrides `config.teacher`. `self_text`, (config.sampled_rows, at most
    seq_len) token ids, is the sampled text (dataset `self`, or `self_mix`) when it was sampled already
    (a recipe samples once for several stages). `resume` continues from the newest whole
    checkpoint in `output_dir` (the configuration must match the one that wrote it); `overwrite`
    replaces an earlier sparsefit output there. SIGTERM / Ctrl-C end the current step, write a
    checkpoint and raise `Interrupted`. Returns the metrics dict.
    """
    info = init_distributed()
    output_dir = Path(output_dir)
    with claim_output(output_dir, overwrite=overwrite, reuse=resume), StopRequest() as stop:
        if info.main:  # the others wait at the first collective; if this raises, torchrun stops them
            _check_resumable(output_dir, resume, overwrite)
            _prepare_output(output_dir, fresh=not resume)
        rows = _checkpointed_rows(output_dir) if resume and config.peft == "rows" else None
        run = _setup(model, tokenizer, config, teacher, device, info, rows, self_text)
        start_step, tokens_seen, resumed_from = 0, 0, None
        if resume:
            restored = _restore(output_dir, model, run)
            if restored is not None:
                start_step, tokens_seen = restored["step"], restored["tokens"]
                resumed_from = start_step
            elif info.main:
                print(f"no checkpoint in {output_dir / CHECKPOINTS_DIR}; starting from step 0", flush=True)
        return _train(model, tokenizer, config, output_dir, run, stop, start_step, tokens_seen, resumed_from, progress)


def _checkpointed_rows(output_dir: Path) -> dict[str, torch.Tensor] | None:
    """The row adapters' rows in the newest whole checkpoint (None without one): a resumed run trains
    the rows it chose before instead of scoring the model again."""
    from safetensors import safe_open

    folder, _ = find_checkpoint(output_dir / CHECKPOINTS_DIR)
    if folder is None:
        return None
    suffix = ".row_delta.rows"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {key[: -len(suffix)]: f.get_tensor(key) for key in f.keys() if key.endswith(suffix)} or None


def _check_resumable(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """`--resume` continues a fine-tune: not a finished one, and not another kind of output."""
    if not resume or overwrite or not output_dir.is_dir() or is_empty_dir(output_dir):
        return
    done = finished_run(output_dir)
    if done is not None:
        raise UsageError(
            f"'{output_dir}' holds a finished fine-tune ({done.get('steps')} steps); "
            "nothing to resume (pass --overwrite to train again)"
        )
    entries = (read_marker(output_dir) or {}).get("entries", [])
    if entries and CHECKPOINTS_DIR not in entries and LOG_FILE not in entries:  # none yet: a folder claimed empty
        raise UsageError(
            f"'{output_dir}' holds a sparsefit output that is not a fine-tune; nothing to resume "
            "(pass --overwrite to replace it)"
        )


def _prepare_output(output_dir: Path, fresh: bool) -> None:
    """Mark the folder as sparsefit's; a fresh run drops what an earlier run left to resume from
    (an earlier final model stays until this run's replaces it)."""
    make_dir(output_dir)
    mark(output_dir, CHECKPOINTS_DIR, LOG_FILE, METRICS_FILE)
    clean_stale_in(output_dir / CHECKPOINTS_DIR)  # a checkpoint a kill cut short
    if fresh:
        discard_dir(output_dir / CHECKPOINTS_DIR)
        for name in (LOG_FILE, METRICS_FILE):
            (output_dir / name).unlink(missing_ok=True)


def _setup(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig,
    teacher: PreTrainedModel | None,
    device: torch.device | str | None,
    info: DistInfo,
    rows: dict[str, torch.Tensor] | None = None,
    self_text: torch.Tensor | None = None,
) -> _Run:
    """Device, masks, teacher, data, length, sharding, optimizer and schedule, in that order."""
    if device is None:
        device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    refuse_row_deltas(model, "fine-tuning")  # trained anew they would bypass the masks and the merge
    model.to(device)
    bf16 = _bf16(config, device)
    torch.manual_seed(config.seed)

    if config.method == "ast":  # the starting model's zeros identify it; the adaptive masks come below
        masks = SparsityMasks.from_zeros(model, config.targets, config.ignore)
    else:
        masks = resolve_masks(model, config)
    fingerprint = run_fingerprint(model, config, info.world, masks)  # before any sharding
    teacher_tok = None
    if config.distilling and teacher is None:
        use_bf16 = config.teacher_dtype == "bfloat16" or (config.teacher_dtype == "auto" and bf16)
        teacher, teacher_tok = load_teacher(config.teacher, torch.bfloat16 if use_bf16 else torch.float32, device)
    if teacher is not None:
        freeze(teacher)
        teacher.to(device)
    examples = []
    if config.dataset != "self":
        examples = load_examples(
            tokenizer,
            config.dataset,
            config.split,
            config.format,
            config.seq_len,
            config.text_field,
            config.prompt_field,
            config.completion_field,
            config.limit,
        )
    if config.sampled_rows:
        if self_text is None:  # sampled before any training step, from the teacher when there is one
            from sparsefit.data.self_generated import sample_from_model

            was_training = model.training
            source = teacher or model.eval()
            self_text = sample_from_model(source, tokenizer, config.sampled_rows, config.seq_len, config.seed)
            model.train(was_training)
        elif self_text.ndim != 2 or len(self_text) != config.sampled_rows or self_text.shape[1] > config.seq_len:
            raise ValueError(
                f"self_text is {tuple(self_text.shape)}; this run trains on {config.sampled_rows} sampled rows "
                f"of at most seq_len {config.seq_len} tokens"
            )
        examples += token_examples(self_text)
    global_batch = config.batch_size * config.grad_accum * info.world
    lengths = [len(e.input_ids) for e in examples]
    steps = total_steps(config, len(examples), sum(lengths) / len(lengths), global_batch)
    example_order(lengths, global_batch, config.seed, 0)  # fails early when one batch cannot be filled

    num_blocks = len(decoder_layout(model).blocks)
    if teacher is not None:
        check_compatible(
            model, tokenizer, teacher, teacher_tok, config.distill_layers, num_blocks, config.square_head_weight > 0
        )
    layers = config.distill_layers if config.distill_layers is not None else list(range(num_blocks))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    adaptive = None
    if config.method == "ast":  # before sharding and the optimizer: SLoRB adds parameters
        stats = micro_batches(config, examples, lengths, info, pad_id, device, config.ast.stats_batches)
        adaptive = setup_adaptive(model, config, steps, stats, teacher)
        masks = adaptive.masks

    adapters = None
    if config.peft != "none":  # before sharding and the optimizer: the base freezes, adapters add parameters
        if info.enabled and config.strategy == "fsdp" and config.adapter.base_bits == 4:
            raise UsageError(
                "a 4-bit base (--base-bits 4) trains with --strategy ddp: FSDP cannot shard its packed weights"
            )
        adapters = setup_adapters(
            model,
            config,
            masks,
            lambda n: micro_batches(config, examples, lengths, info, pad_id, device, n),
            bf16,
            (lambda t: torch.tensor(all_reduce_sum(t.tolist(), info, device), dtype=t.dtype)) if info.enabled else None,
            rows,
        )

    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if adapters is not None:
            model.enable_input_require_grads()  # a frozen base: checkpointed blocks still need a grad path
    model.config.use_cache = False
    model.train()
    fsdp = info.enabled and config.strategy == "fsdp"
    # Merging adapters needs whole weights: under FSDP rank 0 merges in a copy rebuilt from gathered ones.
    skeleton = meta_copy(model) if fsdp and adapters is not None and info.main else None
    if fsdp:  # before the optimizer exists: it must hold the sharded parameters
        shard_model(model)
        if masks is not None:
            masks.shard()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per parameter group, on CPU (torch >= 2.4) as on GPU
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=_fused_ok(device)
    )
    warmup = config.warmup_steps if config.warmup_steps is not None else int(0.1 * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, config.scheduler))

    probe = {k: v.to(device) for k, v in collate(examples[:1], pad_id).items()}
    return _Run(
        info=info,
        device=device,
        bf16=bf16,
        fsdp=fsdp,
        masks=masks,
        teacher=teacher,
        examples=examples,
        lengths=lengths,
        steps=steps,
        layers=layers,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        # Adapters' buffers (chosen rows, masks, 4-bit scales) are equal on every rank by construction:
        # never re-sent, and a rank that chose other rows would show, not be silently overwritten.
        train_model=DistributedDataParallel(model, broadcast_buffers=adapters is None)
        if info.enabled and not fsdp
        else model,
        student_path=HeadPath.detect(model, probe),
        teacher_path=HeadPath.detect(teacher, probe) if teacher is not None else None,
        pad_id=pad_id,
        adaptive=adaptive,
        adapters=adapters,
        skeleton=skeleton,
        fingerprint=fingerprint,
    )


def micro_batches(
    config: FinetuneConfig,
    examples: list,
    lengths: list[int],
    info: DistInfo,
    pad_id: int,
    device: torch.device,
    count: int,
    start_step: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's first `count` micro-batches from step `start_step` on, in training order."""
    per_rank = config.batch_size * config.grad_accum
    global_batch = per_rank * info.world
    step, done = start_step, 0
    while done < count:
        ids = example_order(lengths, global_batch, config.seed, step)[info.rank * per_rank : (info.rank + 1) * per_rank]
        for k in range(config.grad_accum):
            if done == count:
                return
            batch = collate([examples[i] for i in ids[k * config.batch_size : (k + 1) * config.batch_size]], pad_id)
            yield {key: v.to(device) for key, v in batch.items()}
            done += 1
        step += 1


def _restore(output_dir: Path, model: PreTrainedModel, run: _Run) -> dict | None:
    """Load the newest whole checkpoint (chosen by the main process, which checks its manifest) into
    the model, optimizer, schedule and masks; None when there is none."""
    root = output_dir / CHECKPOINTS_DIR
    step, damaged = -1, 0  # the main process checks the manifests; every rank learns its verdict
    if run.info.main:
        folder, warnings = find_checkpoint(root)
        for warning in warnings:
            print(f"warning: {warning}", flush=True)
        step = read_trainer_state(folder)["step"] if folder is not None else -1
        damaged = len(warnings)
    chosen, damaged = all_reduce_sum([step + 1, damaged], run.info, run.device)  # the other ranks add 0
    if chosen == 0 and damaged:
        raise SparsefitError(
            f"no whole checkpoint in {root} ({int(damaged)} damaged, left in place); pass --overwrite to start over"
        )
    if chosen == 0:
        return None
    folder = checkpoint_dir(root, int(chosen) - 1)
    changes = fingerprint_changes(read_trainer_state(folder).get("fingerprint"), run.fingerprint)
    if changes:
        raise UsageError(
            f"cannot resume '{output_dir}': the configuration differs from the checkpoint's in "
            f"{', '.join(changes)}; rerun with the original options, or --overwrite to start over"
        )
    trainer_state, saved_masks, extra = load_training_state(folder, model, run.optimizer, run.scheduler)
    if saved_masks is not None and run.adapters is None:  # with adapters the frozen base's masks never change
        run.masks = SparsityMasks(decoder_linears(model), saved_masks)
        if run.fsdp:
            run.masks.shard()
        if run.adaptive is not None:
            run.adaptive.masks = run.masks
            run.adaptive.load_state_dict(extra)
    if run.info.main:
        print(f"resuming from {folder} (step {trainer_state['step']})", flush=True)
    return trainer_state


def _train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig,
    output_dir: Path,
    run: _Run,
    stop: StopRequest,
    start_step: int,
    tokens_seen: int,
    resumed_from: int | None,
    progress: bool,
) -> dict:
    info, steps = run.info, run.steps
    initial_sparsity = run.masks.sparsity() if run.masks else 0.0
    log = TrainLog(output_dir / LOG_FILE, info.main, start_step)
    bar = tqdm(total=steps, initial=start_step, desc="finetune", disable=not (progress and info.main))
    train_seconds, run_tokens, last_loss = 0.0, 0, float("nan")  # this invocation only (after a resume)
    last_checkpoint = time.monotonic()
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        record = _step(config, run, step, output_dir)
        minutes = config.checkpoint_minutes
        due_by_time = minutes > 0 and time.monotonic() - last_checkpoint >= 60 * minutes
        # one collective for the step's figures and for whether any rank was signalled or is due
        flags = [record.pop("tokens_step"), float(stop.requested), float(due_by_time and info.main)]
        sums = [record[k] for k in ("loss", "ce", "kl", "square_head")]
        reduced = all_reduce_sum([*sums, *flags], info, run.device)
        for k, v in zip(("loss", "ce", "kl", "square_head"), reduced[:4]):
            record[k] = round(v / info.world, 6)
        step_tokens, signalled, due_by_time = int(reduced[4]), reduced[5] > 0, reduced[6] > 0
        tokens_seen += step_tokens
        run_tokens += step_tokens
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        last_loss = record["loss"]
        record.update({"tokens": tokens_seen, "tokens_per_second": step_tokens / seconds})
        if run.masks is not None:
            record["sparsity"] = run.masks.sparsity()
        if step % config.log_every == 0 or step == steps - 1:
            log.write(record)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{step_tokens / seconds:.0f}")
        bar.update(1)
        done = step + 1
        due = (config.checkpoint_every and done % config.checkpoint_every == 0) or due_by_time or signalled
        if due and done < steps:
            _checkpoint(output_dir, model, config, run, done, tokens_seen)
            last_checkpoint = time.monotonic()
        if signalled and done < steps:
            bar.close()
            signum = stop.signum or signal.SIGTERM
            raise Interrupted(
                f"stopped by {signal.Signals(signum).name} after step {done} of {steps}; checkpoint "
                f"{checkpoint_dir(output_dir / CHECKPOINTS_DIR, done)} written: continue with --resume "
                "(a recipe: run it again)",
                signum,
            )
    bar.close()
    if run.adaptive is not None:
        run.adaptive.finalize()  # the mask freezes: W *= M, an exact N:M model
    metrics = {
        "completed": True,
        "steps": steps,
        "resumed_from": resumed_from,
        "tokens": tokens_seen,
        "train_seconds": train_seconds,
        "tokens_per_second": run_tokens / train_seconds if train_seconds else None,
        "checkpoint_seconds": run.checkpoint_seconds,
        "checkpoints": run.checkpoints,
        "final_loss": last_loss,
        "bf16": run.bf16,
        "world_size": info.world,
        "strategy": "fsdp" if run.fsdp else "ddp" if info.enabled else "single process",
        "examples": len(run.examples),
        "mean_example_tokens": sum(run.lengths) / len(run.lengths),
        "masks": run.masks is not None,
        "initial_sparsity": initial_sparsity,
        "sparsity": run.masks.sparsity() if run.masks is not None else 0.0,
        "revived_weights": run.masks.revived() if run.masks is not None else 0,
        "peak_rss_mb": peak_rss_mb(),
        "method": config.method,
        **({"structure": config.ast.structure, "slorb": slorb_info(model)} if run.adaptive is not None else {}),
        **({"adapters": run.adapters.metrics()} if run.adapters is not None else {}),
        "config": config.model_dump(),
        "fingerprint": run.fingerprint,
    }
    _finish(model, tokenizer, config, output_dir, run, metrics, tokens_seen)
    (signalled,) = all_reduce_sum([float(stop.requested)], info, run.device)
    if signalled:  # during the last step or the final save: the run is complete, the caller stops
        signum = stop.signum or signal.SIGTERM
        raise Interrupted(f"stopped by {signal.Signals(signum).name} after the final model was written", signum)
    return metrics


def _step(config: FinetuneConfig, run: _Run, step: int, output_dir: Path) -> dict:
    """One optimizer step: this rank's losses (averaged over micro-batches), tokens, lr and gradient norm."""
    if config.gmp is not None:
        gmp = config.gmp
        target = gmp_sparsity(step, gmp.initial, gmp.final, gmp.start, gmp.end, gmp.every)
        if target is not None:
            gmp_update(run.masks, target, run.optimizer)
    sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "square_head": 0.0}
    extra = _adaptive_before(config, run, step) if run.adaptive is not None else {}
    try:
        step_tokens = _accumulate(config, run, step, output_dir, sums)
    finally:
        if run.adaptive is not None:
            run.adaptive.restore_weights()  # the dense weights, with the gradient of W * M (STE)
    if run.adaptive is None and run.adapters is None and run.masks is not None:
        run.masks.apply_to_grads()
    # the norm is checked even without clipping: a non-finite gradient must never reach the weights
    if config.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
    grad_norm = float(full(norm))
    if not math.isfinite(grad_norm):  # before the step: weights stay good
        raise _non_finite(step, grad_norm, output_dir, "gradient norm")
    if run.adaptive is not None:
        extra["srste_lambda"] = run.adaptive.decay_grads(step)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.adaptive is None and run.adapters is None and run.masks is not None:
        run.masks.apply_to_weights()
    return {"step": step, **sums, "lr": lr, "grad_norm": grad_norm, "tokens_step": step_tokens, **extra}


def _adaptive_before(config: FinetuneConfig, run: _Run, step: int) -> dict:
    """AST before the forward: refresh Wanda's statistics and the masks when due, then mask the weights."""
    ast, extra = run.adaptive, {}
    model = getattr(run.train_model, "module", run.train_model)  # DDP's forward is for training steps
    if ast.due(step):
        every = config.ast.stats_every
        if ast.input_sq_sum is not None and every and step % every == 0:
            ast.mask_weights()  # gathered on the model as it runs: W * M
            try:
                was_training = model.training
                batches = micro_batches(
                    config, run.examples, run.lengths, run.info, run.pad_id, run.device, config.ast.stats_batches, step
                )
                ast.input_sq_sum = input_sq_sums(model.eval(), ast.masks.modules, batches)
                model.train(was_training)
            finally:
                ast.restore_weights()
        extra["mask_flip_rate"] = ast.update()
    ast.mask_weights()
    return extra


def _accumulate(config: FinetuneConfig, run: _Run, step: int, output_dir: Path, sums: dict) -> int:
    """Forward and backward over the step's micro-batches; adds each loss term to `sums`, returns the tokens."""
    info = run.info
    step_tokens = 0
    autocast = (lambda: torch.autocast(run.device.type, dtype=torch.bfloat16)) if run.bf16 else nullcontext
    batches = micro_batches(config, run.examples, run.lengths, info, run.pad_id, run.device, config.grad_accum, step)
    for k, batch in enumerate(batches):
        step_tokens += int(batch["attention_mask"].sum())
        last_micro = k == config.grad_accum - 1
        if run.fsdp:
            run.train_model.set_requires_gradient_sync(last_micro)
        sync = nullcontext() if (last_micro or not info.enabled or run.fsdp) else run.train_model.no_sync()
        with sync:
            with autocast():
                losses = compute_losses(
                    run.train_model, run.teacher, batch, config, run.layers, run.student_path, run.teacher_path
                )
            # every rank must agree before backward, or a rank that stops leaves the others waiting
            (value,) = all_reduce_sum([float(losses["loss"].detach())], info, run.device)
            if not math.isfinite(value):
                raise _non_finite(step, value, output_dir)
            (losses["loss"] / config.grad_accum).backward()
        for key, v in losses.items():
            sums[key] += float(v.detach()) / config.grad_accum
    return step_tokens


@torch.no_grad()
def weight_sparsity(masks: SparsityMasks) -> float:
    """The fraction of exact zeros in the masked layers' weights as they are now (after a merge)."""
    zeros = sum(int((m.weight == 0).sum()) for m in masks.modules.values())
    return zeros / max(sum(m.weight.numel() for m in masks.modules.values()), 1)


def _params_finite(model: torch.nn.Module, run: _Run) -> bool:
    bad = sum(0 if torch.isfinite(local(p.detach())).all() else 1 for p in model.parameters())
    (total,) = all_reduce_sum([float(bad)], run.info, run.device)
    return total == 0


def _checkpoint(
    output_dir: Path, model: PreTrainedModel, config: FinetuneConfig, run: _Run, step: int, tokens: int
) -> None:
    """Publish a checkpoint after `step` steps; a model with a non-finite parameter is never saved."""
    if not _params_finite(model, run):
        raise _non_finite(step - 1, float("nan"), output_dir, "a parameter")
    t = time.perf_counter()
    save_training_state(  # every rank: an FSDP model and its masks are gathered collectively
        output_dir / CHECKPOINTS_DIR,
        model,
        run.masks.state_dict() if run.masks else None,
        run.optimizer,
        run.scheduler,
        {"step": step, "tokens": tokens, "fingerprint": run.fingerprint},
        write=run.info.main,
        keep=config.keep_checkpoints,
        extra=run.adaptive.state_dict() if run.adaptive is not None else None,
    )
    barrier(run.info)
    run.checkpoint_seconds += time.perf_counter() - t
    run.checkpoints += 1


def _finish(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig,
    output_dir: Path,
    run: _Run,
    metrics: dict,
    tokens: int,
) -> None:
    """Check the result, then publish the final checkpoint in place of the training folder."""
    from sparsefit.export import save_checkpoint

    if metrics["revived_weights"]:
        revived = metrics["revived_weights"]
        raise SparsefitError(
            f"{revived} pruned weights became nonzero during training; this is a bug, please report it"
        )
    if not _params_finite(model, run):
        raise _non_finite(run.steps - 1, float("nan"), output_dir, "a parameter")
    foreign = foreign_entries(output_dir) if run.info.main else []
    (blocked,) = all_reduce_sum([float(len(foreign))], run.info, run.device)
    if blocked:  # keep the trained state, then ask for the folder to be cleared
        _checkpoint(output_dir, model, config, run, run.steps, tokens)
        raise UsageError(
            f"'{output_dir}' now holds files sparsefit did not write ({', '.join(foreign[:3])}); the trained "
            f"state is in {checkpoint_dir(output_dir / CHECKPOINTS_DIR, run.steps)}: move those files out and "
            "rerun with --resume to write the final model"
        )
    _for_inference(model, config)
    masks = run.masks
    if run.fsdp and run.adapters is not None:  # every rank gathers; rank 0 merges in its whole copy
        keep = masks.state_dict() if masks is not None else None
        weights = model_state(model)
        if run.info.main:
            whole = _for_inference(filled(run.skeleton, weights), config)
            masks = None if keep is None else _masks_of_copy(run.masks, keep, model, whole)
            model, weights = whole, None
    else:
        weights = model_state(model) if run.fsdp else None  # gathered on rank 0; every rank takes part
    if run.adapters is not None and (run.info.main or not run.fsdp):  # only now: a blocked save left a checkpoint
        metrics["adapters"].update(finish_adapters(model, config, masks))
        if masks is not None:
            metrics["adapters"]["merged_sparsity"] = metrics["sparsity"] = weight_sparsity(masks)
    if run.info.main:
        save_checkpoint(
            model,
            tokenizer,
            output_dir,
            {"finetune": metrics},
            extra_files={METRICS_FILE: json.dumps(metrics, indent=2) + "\n"},
            carry=(LOG_FILE,),
            state_dict=weights,
            label="final",
        )
    barrier(run.info)


def _for_inference(model: PreTrainedModel, config: FinetuneConfig) -> PreTrainedModel:
    """Undo what training set on the model: train mode, gradient checkpointing, no KV cache."""
    model.train(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    return model


def _masks_of_copy(
    masks: SparsityMasks, keep: dict[str, torch.Tensor], model: torch.nn.Module, whole: torch.nn.Module
) -> SparsityMasks:
    """`masks` of `model` as full `keep` tensors, bound to the same linears of `whole` (its rebuilt copy),
    found by the names the linears have now (LoRA moved each to `<name>.base_layer`)."""
    where = {id(m): name for name, m in model.named_modules()}
    modules = dict(whole.named_modules())
    return SparsityMasks({n: modules[where[id(masks.modules[n])]] for n in keep}, keep)


def _fused_ok(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


def _non_finite(step: int, value: float, output_dir: Path, what: str = "loss") -> SparsefitError:
    steps = published_steps(output_dir / CHECKPOINTS_DIR)  # each was checked finite before it was saved
    folder = checkpoint_dir(output_dir / CHECKPOINTS_DIR, steps[0]) if steps else None
    where = f"the last good checkpoint is {folder}; rerun with --resume" if folder else "no checkpoint was written yet"
    fix = "lower --lr" if what != "loss" else "lower --lr or enable clipping"
    return SparsefitError(f"{what} became {value} at step {step}; stopped without saving it ({where}), then {fix}")
