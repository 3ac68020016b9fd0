"""The fine-tuning loop: one loop for dense fine-tuning, sparse (mask-preserving) fine-tuning,
distillation from a dense teacher and gradual pruning, on one device or many (DDP or FSDP).

Per step: (GMP mask update) -> micro-batches: forward, losses, backward -> zero pruned grads ->
gradient norm (clipped when max_grad_norm > 0) -> AdamW step -> re-apply masks -> log ->
checkpoint when one is due or a stop signal arrived. With method `ast` (`training.adaptive`) the
weights stay dense: the masks are recomputed every few steps, the forward sees W * M, pruned
weights get the straight-through gradient plus SR-STE's decay, and W *= M once at the end.
This file only orders the pieces: the set-up (`prepare`), the mask steps (`mask_steps`), the
losses (`losses`), checkpoints and resume (`resume`), the log (`log`) and the final save (`finish`).

The output folder holds `train_log.jsonl` and `checkpoints/step-N/` while training; at the end
one atomic exchange puts the final HF checkpoint (with `sparsity.json`, `metrics.json` and the
log) in its place, and the checkpoints go with the old folder.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from sparsefit.errors import Interrupted
from sparsefit.outputs import claim_output
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.data import micro_batches
from sparsefit.training.distributed import all_reduce_sum, init_distributed
from sparsefit.training.finish import finish, run_metrics
from sparsefit.training.log import LOG_FILE, TrainLog
from sparsefit.training.losses import compute_losses
from sparsefit.training.mask_steps import adaptive_before, gmp_step
from sparsefit.training.prepare import prepare_run
from sparsefit.training.resume import (
    BOOKKEEPING,
    CHECKPOINTS_DIR,
    METRICS_FILE,
    check_resumable,
    checkpointed_rows,
    fingerprint_changes,
    finished_run,
    non_finite,
    options_fingerprint,
    prepare_output,
    restore,
    write_checkpoint,
)
from sparsefit.training.run import Run
from sparsefit.training.sharding import full
from sparsefit.training.signals import StopRequest
from sparsefit.training.state import checkpoint_dir
from sparsefit.training.trackers import check_tracker, open_tracker

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Names other modules and the tests import from here (the loop's public face).
__all__ = [
    "BOOKKEEPING",
    "CHECKPOINTS_DIR",
    "LOG_FILE",
    "METRICS_FILE",
    "fingerprint_changes",
    "finetune",
    "finished_run",
    "options_fingerprint",
]


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
    check_tracker(config.report_to)  # a missing library fails before any work
    with claim_output(output_dir, overwrite=overwrite, reuse=resume), StopRequest() as stop:
        if info.main:  # the others wait at the first collective; if this raises, torchrun stops them
            check_resumable(output_dir, resume, overwrite)
            prepare_output(output_dir, fresh=not resume, tracking=config.report_to != "none")
        rows = checkpointed_rows(output_dir) if resume and config.peft == "rows" else None
        run = prepare_run(model, tokenizer, config, teacher, device, info, rows, self_text)
        start_step, tokens_seen, resumed_from = 0, 0, None
        if resume:
            restored = restore(output_dir, model, run)
            if restored is not None:
                start_step, tokens_seen = restored["step"], restored["tokens"]
                resumed_from = start_step
            elif info.main:
                print(f"no checkpoint in {output_dir / CHECKPOINTS_DIR}; starting from step 0", flush=True)
        return _train(model, tokenizer, config, output_dir, run, stop, start_step, tokens_seen, resumed_from, progress)


def _train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig,
    output_dir: Path,
    run: Run,
    stop: StopRequest,
    start_step: int,
    tokens_seen: int,
    resumed_from: int | None,
    progress: bool,
) -> dict:
    info, steps = run.info, run.steps
    initial_sparsity = run.masks.sparsity() if run.masks else 0.0
    tracker = (
        open_tracker(config.report_to, output_dir, config.model_dump(mode="json"), start_step) if info.main else None
    )
    log = TrainLog(output_dir / LOG_FILE, info.main, start_step, tracker)
    bar = tqdm(total=steps, initial=start_step, desc="finetune", unit="step", disable=not (progress and info.main))
    train_seconds, run_tokens, last_loss = 0.0, 0, float("nan")  # this invocation only (after a resume)
    last_checkpoint = time.monotonic()
    try:
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
            # tokens/s over this invocation's steps: steadier than one step's, and what metrics report
            bar.set_postfix(
                loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{run_tokens / train_seconds:.0f}"
            )
            bar.update(1)
            done = step + 1
            due = (config.checkpoint_every and done % config.checkpoint_every == 0) or due_by_time or signalled
            if due and done < steps:
                write_checkpoint(output_dir, model, config, run, done, tokens_seen)
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
    finally:  # closed before the final save, which carries its files into the model folder
        log.close()
    if run.adaptive is not None:
        run.adaptive.finalize()  # the mask freezes: W *= M, an exact N:M model
    metrics = run_metrics(
        model, config, run, resumed_from, tokens_seen, train_seconds, run_tokens, last_loss, initial_sparsity
    )
    finish(model, tokenizer, config, output_dir, run, metrics, tokens_seen)
    (signalled,) = all_reduce_sum([float(stop.requested)], info, run.device)
    if signalled:  # during the last step or the final save: the run is complete, the caller stops
        signum = stop.signum or signal.SIGTERM
        raise Interrupted(f"stopped by {signal.Signals(signum).name} after the final model was written", signum)
    return metrics


def _step(config: FinetuneConfig, run: Run, step: int, output_dir: Path) -> dict:
    """One optimizer step: this rank's losses (averaged over micro-batches), tokens, lr and gradient norm."""
    gmp_step(config, run, step)
    sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "square_head": 0.0}
    extra = adaptive_before(config, run, step) if run.adaptive is not None else {}
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
        raise non_finite(step, grad_norm, output_dir, "gradient norm")
    if run.adaptive is not None:
        extra["srste_lambda"] = run.adaptive.decay_grads(step)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.adaptive is None and run.adapters is None and run.masks is not None:
        run.masks.apply_to_weights()
    return {"step": step, **sums, "lr": lr, "grad_norm": grad_norm, "tokens_step": step_tokens, **extra}


def _accumulate(config: FinetuneConfig, run: Run, step: int, output_dir: Path, sums: dict) -> int:
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
                raise non_finite(step, value, output_dir)
            (losses["loss"] / config.grad_accum).backward()
        for key, v in losses.items():
            sums[key] += float(v.detach()) / config.grad_accum
    return step_tokens
