"""The fine-tuning loop: one loop for dense fine-tuning, sparse (mask-preserving) fine-tuning,
distillation from a dense teacher and gradual pruning, on one device or many (DDP or FSDP).

Per step: (GMP mask update) -> micro-batches: forward, losses, backward -> zero pruned grads ->
clip -> AdamW step -> re-apply masks. Masks, losses, schedules and checkpoints are library
pieces; this file only orders them.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from sparsefit.atomic import write_json
from sparsefit.errors import SparsefitError
from sparsefit.models.layout import decoder_layout
from sparsefit.pruning.magnitude import prune_magnitude
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.data import collate, example_order, load_examples, self_examples
from sparsefit.training.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from sparsefit.training.losses import HeadPath, compute_losses
from sparsefit.training.masks import SparsityMasks, decoder_linears
from sparsefit.training.schedules import gmp_sparsity, lr_factor
from sparsefit.training.sharding import full, model_state, shard_model
from sparsefit.training.state import has_training_state, load_training_state, save_training_state
from sparsefit.training.teacher import check_compatible, freeze, load_teacher

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train_log.jsonl"
METRICS_FILE = "metrics.json"


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


class _Log:
    """The per-step JSONL log (main process only); a resumed run drops the lines of steps it redoes."""

    def __init__(self, path: Path, enabled: bool, resume_step: int) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step > 0 and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig,
    output_dir: str | Path,
    teacher: PreTrainedModel | None = None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> dict:
    """Train `model` in place as `config` says; write the final checkpoint, log and metrics into `output_dir`.

    `teacher` (already loaded) overrides `config.teacher`. Returns the metrics dict.
    """
    from sparsefit.export import save_checkpoint

    info = init_distributed()
    output_dir = Path(output_dir)
    ckpt_dir = output_dir / CHECKPOINT_DIR
    if device is None:
        device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    model.to(device)
    bf16 = _bf16(config, device)
    torch.manual_seed(config.seed)

    masks = resolve_masks(model, config)
    teacher_tok = None
    if config.distilling and teacher is None:
        use_bf16 = config.teacher_dtype == "bfloat16" or (config.teacher_dtype == "auto" and bf16)
        teacher, teacher_tok = load_teacher(config.teacher, torch.bfloat16 if use_bf16 else torch.float32, device)
    if teacher is not None:
        freeze(teacher)
        teacher.to(device)
    if config.dataset == "self":  # sampled before any training step, from the teacher when there is one
        was_training = model.training
        examples = self_examples(teacher or model.eval(), tokenizer, config.self_samples, config.seq_len, config.seed)
        model.train(was_training)
    else:
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
    per_rank = config.batch_size * config.grad_accum
    global_batch = per_rank * info.world
    lengths = [len(e.input_ids) for e in examples]
    mean_tokens = sum(lengths) / len(lengths)
    steps = total_steps(config, len(examples), mean_tokens, global_batch)
    example_order(lengths, global_batch, config.seed, 0)  # fails early when one batch cannot be filled
    warmup = config.warmup_steps if config.warmup_steps is not None else int(0.1 * steps)

    num_blocks = len(decoder_layout(model).blocks)
    if teacher is not None:
        check_compatible(
            model, tokenizer, teacher, teacher_tok, config.distill_layers, num_blocks, config.square_head_weight > 0
        )
    layers = config.distill_layers if config.distill_layers is not None else list(range(num_blocks))

    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    fsdp = info.enabled and config.strategy == "fsdp"
    if fsdp:  # before the optimizer exists: it must hold the sharded parameters
        shard_model(model)
        if masks is not None:
            masks.shard()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per parameter group, on CPU (torch >= 2.4) as on GPU
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=_fused_ok(device)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, config.scheduler))

    start_step, tokens_seen, resumed_from = 0, 0, None
    if resume and has_training_state(ckpt_dir):
        trainer_state, saved_masks = load_training_state(ckpt_dir, model, optimizer, scheduler)
        start_step, tokens_seen, resumed_from = trainer_state["step"], trainer_state["tokens"], trainer_state["step"]
        if saved_masks is not None:
            masks = SparsityMasks(decoder_linears(model), saved_masks)
            if fsdp:
                masks.shard()
    elif resume and info.main:
        print(f"no checkpoint in {ckpt_dir}; starting from step 0", flush=True)
    initial_sparsity = masks.sparsity() if masks else 0.0

    train_model = DistributedDataParallel(model) if info.enabled and not fsdp else model
    if info.main:
        output_dir.mkdir(parents=True, exist_ok=True)
    log = _Log(output_dir / LOG_FILE, info.main, start_step)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    probe = collate(examples[:1], pad_id)
    student_path = HeadPath.detect(model, {k: v.to(device) for k, v in probe.items()})
    teacher_path = HeadPath.detect(teacher, {k: v.to(device) for k, v in probe.items()}) if teacher else None
    bar = tqdm(total=steps, initial=start_step, desc="finetune", disable=not (progress and info.main))
    train_seconds, run_tokens, last_loss = 0.0, 0, float("nan")  # this invocation only (after a resume)
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        if config.gmp is not None:
            target = gmp_sparsity(
                step, config.gmp.initial, config.gmp.final, config.gmp.start, config.gmp.end, config.gmp.every
            )
            if target is not None:
                gmp_update(masks, target, optimizer)
        ids = example_order(lengths, global_batch, config.seed, step)[info.rank * per_rank : (info.rank + 1) * per_rank]
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "square_head": 0.0}
        step_tokens = 0
        for k in range(config.grad_accum):
            batch = collate([examples[i] for i in ids[k * config.batch_size : (k + 1) * config.batch_size]], pad_id)
            batch = {key: v.to(device) for key, v in batch.items()}
            step_tokens += int(batch["attention_mask"].sum())
            last_micro = k == config.grad_accum - 1
            if fsdp:
                model.set_requires_gradient_sync(last_micro)
            sync = nullcontext() if (last_micro or not info.enabled or fsdp) else train_model.no_sync()
            with sync:
                with autocast():
                    losses = compute_losses(train_model, teacher, batch, config, layers, student_path, teacher_path)
                total = losses["loss"] / config.grad_accum
                # every rank must agree before backward, or a rank that stops leaves the others waiting
                (value,) = all_reduce_sum([float(losses["loss"].detach())], info, device)
                if not math.isfinite(value):
                    raise _non_finite(step, value, ckpt_dir)
                total.backward()
            for key, v in losses.items():
                sums[key] += float(v.detach()) / config.grad_accum
        if masks is not None:
            masks.apply_to_grads()
        grad_norm = (
            float(full(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)))
            if config.max_grad_norm > 0
            else None
        )
        if grad_norm is not None and not math.isfinite(grad_norm):  # before the step: weights stay good
            raise _non_finite(step, grad_norm, ckpt_dir, "gradient norm")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if masks is not None:
            masks.apply_to_weights()
        reduced = all_reduce_sum([*sums.values(), step_tokens], info, device)
        sums = {key: v / info.world for key, v in zip(sums, reduced[:-1])}
        step_tokens = int(reduced[-1])
        tokens_seen += step_tokens
        run_tokens += step_tokens
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        last_loss = sums["loss"]
        record = {"step": step, **{k: round(v, 6) for k, v in sums.items()}, "lr": lr, "tokens": tokens_seen}
        record.update({"tokens_per_second": step_tokens / seconds, "grad_norm": grad_norm})
        if masks is not None:
            record["sparsity"] = masks.sparsity()
        if step % config.log_every == 0 or step == steps - 1:
            log.write(record)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / seconds:.0f}")
        bar.update(1)
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < steps:
            _checkpoint(ckpt_dir, model, masks, optimizer, scheduler, done, tokens_seen, info)
    bar.close()

    revived = masks.revived() if masks is not None else 0
    if revived:
        raise SparsefitError(
            f"{revived} pruned weights became nonzero during training; this is a bug, please report it"
        )
    metrics = {
        "completed": True,
        "steps": steps,
        "resumed_from": resumed_from,
        "tokens": tokens_seen,
        "train_seconds": train_seconds,
        "tokens_per_second": run_tokens / train_seconds if train_seconds else None,
        "final_loss": last_loss,
        "bf16": bf16,
        "world_size": info.world,
        "strategy": "fsdp" if fsdp else "ddp" if info.enabled else "single process",
        "examples": len(examples),
        "mean_example_tokens": mean_tokens,
        "masks": masks is not None,
        "initial_sparsity": initial_sparsity,
        "sparsity": masks.sparsity() if masks is not None else 0.0,
        "revived_weights": revived,
        "config": config.model_dump(),
    }
    model.train(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    weights = model_state(model) if fsdp else None  # gathered on rank 0; every rank takes part
    if info.main:
        save_checkpoint(model, tokenizer, output_dir, {"finetune": metrics}, into_existing=True, state_dict=weights)
        write_json(output_dir / METRICS_FILE, metrics)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    barrier(info)
    return metrics


def _fused_ok(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


def _non_finite(step: int, value: float, ckpt_dir: Path, what: str = "loss") -> SparsefitError:
    where = (
        f"the last good checkpoint is {ckpt_dir}; rerun with --resume"
        if has_training_state(ckpt_dir)
        else "no checkpoint was written yet"
    )
    fix = "lower --lr" if what != "loss" else "lower --lr or enable clipping"
    return SparsefitError(f"{what} became {value} at step {step}; stopped ({where}), then {fix}")


def _checkpoint(ckpt_dir, model, masks, optimizer, scheduler, step, tokens, info: DistInfo) -> None:  # noqa: ANN001
    save_training_state(  # every rank: an FSDP model and its masks are gathered collectively
        ckpt_dir,
        model,
        masks.state_dict() if masks else None,
        optimizer,
        scheduler,
        {"step": step, "tokens": tokens},
        write=info.main,
    )
    barrier(info)
