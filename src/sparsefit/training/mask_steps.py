"""What the loop does with the sparsity masks: choose them at the start, prune by magnitude on the GMP
schedule, refresh AST's adaptive masks before a step's forward, and measure the zeros at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.pytorch_utils import Conv1D

from sparsefit.pruning.magnitude import prune_magnitude
from sparsefit.training.adaptive import input_sq_sums
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.data import micro_batches
from sparsefit.training.masks import SparsityMasks
from sparsefit.training.schedules import gmp_sparsity
from sparsefit.training.sharding import full

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from sparsefit.training.run import Run


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


def gmp_step(config: FinetuneConfig, run: Run, step: int) -> None:
    """Gradual magnitude pruning: raise the sparsity when the schedule has an update at `step`."""
    if config.gmp is not None:
        gmp = config.gmp
        target = gmp_sparsity(step, gmp.initial, gmp.final, gmp.start, gmp.end, gmp.every)
        if target is not None:
            gmp_update(run.masks, target, run.optimizer)


def adaptive_before(config: FinetuneConfig, run: Run, step: int) -> dict:
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


@torch.no_grad()
def weight_sparsity(masks: SparsityMasks) -> float:
    """The fraction of exact zeros in the masked layers' weights as they are now (after a merge)."""
    zeros = sum(int((m.weight == 0).sum()) for m in masks.modules.values())
    return zeros / max(sum(m.weight.numel() for m in masks.modules.values()), 1)


def masks_of_copy(
    masks: SparsityMasks, keep: dict[str, torch.Tensor], model: torch.nn.Module, whole: torch.nn.Module
) -> SparsityMasks:
    """`masks` of `model` as full `keep` tensors, bound to the same linears of `whole` (its rebuilt copy),
    found by the names the linears have now (LoRA moved each to `<name>.base_layer`)."""
    where = {id(m): name for name, m in model.named_modules()}
    modules = dict(whole.named_modules())
    return SparsityMasks({n: modules[where[id(masks.modules[n])]] for n in keep}, keep)
