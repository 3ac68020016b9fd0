"""LoRA (Hu et al., 2021) through peft, the baseline of the row adapters, with what a sparse model
needs at merge time.

LoRA's update B A is dense: a plain merge W += B A refills every pruned weight. `merge_lora` reports
how much sparsity a plain merge leaves, and its masked variant re-applies the base's mask after
merging (W = (W + B A) * M), which keeps the sparsity exactly at some cost in accuracy (measured in
benchmarks/adapters.py). Adapters are injected into the model in place (`peft.inject_adapter_in_model`),
so the training loop, the checkpoints and the losses see the same model object as without them.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsefit.errors import UsageError

ADAPTER = "default"


def attach_lora(linears: dict[str, nn.Module], model: nn.Module, rank: int, alpha: float, dropout: float) -> int:
    """Inject LoRA of `rank` into each linear of `linears` (names as in `model.named_modules()`);
    returns the parameters added. B starts at zero (peft's default), so the model is unchanged."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UsageError("LoRA needs the peft package: pip install 'sparsefit[peft]'") from None

    before = sum(p.numel() for p in model.parameters())
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="|".join(f"(?:{re.escape(name)})" for name in linears),  # a string: full-name matches
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in linears.values()),  # GPT-2 stores (in, out)
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    return sum(p.numel() for p in model.parameters()) - before


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merge_lora(model: nn.Module, keep: dict[nn.Module, torch.Tensor] | None = None, masked: bool = True) -> dict:
    """Fold every LoRA update into its base weight and put the base linear back in the model.

    `keep` maps a base linear to its keep mask (as `SparsityMasks` holds it); with `masked`, those
    layers merge as (W + B A) * M. Returns the layers merged and `revived_by_plain_merge`: how many
    pruned weights a plain merge makes nonzero (left nonzero unless `masked`).
    """
    found = lora_modules(model)
    revived = 0
    parents = dict(model.named_modules())
    for name, module in found.items():
        base = module.get_base_layer()
        merged = base.weight.float() + module.get_delta_weight(ADAPTER).float()
        mask = None if keep is None else keep.get(base)
        if mask is not None:
            revived += int(((merged != 0) & ~mask).sum())
            if masked:
                merged *= mask
        base.weight.data = merged.to(base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(parents[parent_name] if parent_name else model, child, base)
    return {"layers": len(found), "revived_by_plain_merge": revived}
