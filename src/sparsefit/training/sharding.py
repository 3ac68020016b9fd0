"""FSDP (torch's FSDP2, `fully_shard`) for the fine-tuning loop: shard, gather, restore.

Each decoder block is one FSDP unit, the root (embeddings, final norm, head) another. Parameters
become DTensors sharded on dim 0; masks are sharded the same way (see `SparsityMasks.shard`), so
enforcing them stays a local multiply. Checkpoints stay plain safetensors: weights and optimizer
state are gathered to full tensors on rank 0 to save, and given back to every rank's shard on load.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from sparsefit.models.layout import decoder_layout

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0's CPU only
_SCATTER = StateDictOptions(full_state_dict=True)  # every rank holds the full dict and keeps its shard


def shard_model(model: nn.Module) -> None:
    """fully_shard every decoder block, then the root, over all processes of the default group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in decoder_layout(model).blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are storage-less (meta device); buffers are copied.

    Taken before sharding, it keeps the exact module structure (adapters, parametrizations, hooks)
    for `filled`, which rebuilds the whole model from gathered weights without a second set of them.
    """
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def filled(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """`meta_copy`'s skeleton holding the full `state` (`model_state`'s gathered weights), unsharded."""
    skeleton.load_state_dict(state, assign=True)
    return skeleton


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a DTensor: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(t: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`t` (full, identical on every rank) laid out as `reference`: this rank's shard when it is a DTensor."""
    if not isinstance(reference, DTensor):
        return t
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank already has t, so each just keeps its chunk (no communication)
    return distribute_tensor(t, reference.device_mesh, reference.placements, src_data_rank=None)


def global_sum(value: int | float, sharded: bool) -> float:
    """Sum of a per-rank count over the ranks that each hold a part (a no-op when nothing is sharded)."""
    if not sharded:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights on rank 0 (empty elsewhere); every rank must call it.

    Tied parameters (embeddings and head) come back as one tensor under each name, as in the model's
    own state dict, so `save_pretrained` writes them once.
    """
    state = get_model_state_dict(model, options=_GATHER)
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        source = first.setdefault(id(p), name)
        if source != name and source in state and name in state:
            state[name] = state[source]
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name on rank 0 (empty elsewhere); every rank must call it."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, state, options=_SCATTER)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_SCATTER)
