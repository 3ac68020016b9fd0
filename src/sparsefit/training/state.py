"""Training checkpoints in safetensors + JSON only (no pickle): weights, masks, optimizer, scheduler, RNG.

Written into a staging directory and renamed into place, so a run killed mid-save keeps the
previous checkpoint whole. An FSDP-sharded model is gathered to full tensors first (same files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from sparsefit.atomic import staging_dir
from sparsefit.training import sharding

TRAINER_FILE = "trainer_state.json"


def _optimizer_to_flat(sd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer state dict (keyed by parameter index, or by name under FSDP) as flat tensors + groups."""
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int | str, dict] = {}
    for key, value in tensors.items():
        idx, name = key.rsplit(".", 1)  # "3.exp_avg", or "model.layers.0.mlp.up_proj.weight.exp_avg"
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[name] = value
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): give repeats their own copy."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.add(ptr)
    return out


def save_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer: dict,
    write: bool = True,
) -> Path:
    """Every rank calls this (an FSDP model is gathered collectively); only the one with `write` saves."""
    sharded = sharding.is_sharded(model)
    weights = sharding.model_state(model) if sharded else None
    optim = sharding.optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
    if not write:
        return Path(path)
    with staging_dir(path) as stage:
        if sharded:
            save_file(_unshared(weights), str(stage / "model.safetensors"))
        else:
            save_model(model, str(stage / "model.safetensors"))  # handles tied embeddings
        if masks:
            save_file(masks, str(stage / "masks.safetensors"))
        tensors, groups = _optimizer_to_flat(optim)
        save_file(tensors, str(stage / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(stage / "rng.safetensors"))
        meta = {"trainer": trainer, "optimizer_groups": groups, "scheduler": scheduler.state_dict()}
        (stage / TRAINER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)


def has_training_state(path: str | os.PathLike) -> bool:
    return (Path(path) / TRAINER_FILE).is_file()


def load_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Restore model, optimizer, scheduler and RNG in place; returns (trainer state, masks or None)."""
    path = Path(path)
    meta = json.loads((path / TRAINER_FILE).read_text())
    device = next(model.parameters()).device
    if sharding.is_sharded(model):  # every rank reads the full tensors and keeps its shard
        sharding.load_model_state(model, load_file(str(path / "model.safetensors"), device=str(device)))
        tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
        sharding.load_optimizer_state(model, optimizer, _optimizer_from_flat(tensors, meta["optimizer_groups"]))
    else:
        load_model(model, str(path / "model.safetensors"), device=str(device))
        tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
        optimizer.load_state_dict(_optimizer_from_flat(tensors, meta["optimizer_groups"]))
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    masks_file = path / "masks.safetensors"
    masks = load_file(str(masks_file)) if masks_file.is_file() else None
    return meta["trainer"], masks
