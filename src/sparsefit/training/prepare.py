"""A fine-tune's set-up, once before the first step: device, masks, teacher, data, length, AST or
adapters, sharding, optimizer and schedule, in that order (`prepare_run`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel

from sparsefit.errors import UsageError
from sparsefit.models.layout import decoder_layout
from sparsefit.models.row_deltas import refuse_row_deltas
from sparsefit.training.adapters.finetune import setup_adapters
from sparsefit.training.adaptive import setup_adaptive
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.data import collate, example_order, micro_batches, run_examples
from sparsefit.training.distributed import DistInfo, all_reduce_sum
from sparsefit.training.losses import HeadPath
from sparsefit.training.mask_steps import resolve_masks
from sparsefit.training.masks import SparsityMasks
from sparsefit.training.resume import run_fingerprint
from sparsefit.training.run import Run
from sparsefit.training.schedules import lr_factor
from sparsefit.training.sharding import meta_copy, shard_model
from sparsefit.training.teacher import check_compatible, prepare_teacher

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


def _fused_ok(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


def prepare_run(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig,
    teacher: PreTrainedModel | None,
    device: torch.device | str | None,
    info: DistInfo,
    rows: dict[str, torch.Tensor] | None = None,
    self_text: torch.Tensor | None = None,
) -> Run:
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
    teacher, teacher_tok = prepare_teacher(config, teacher, device, bf16)
    examples = run_examples(config, tokenizer, model, teacher, self_text)
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
    return Run(
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
