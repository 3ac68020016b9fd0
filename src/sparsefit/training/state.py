"""Training checkpoints in safetensors + JSON only (no pickle): weights, masks, optimizer, scheduler, RNG.

Each checkpoint is its own folder, `checkpoints/step-00000040/`, built in a staging folder, fsync'ed
and published by one rename, so a kill at any instant leaves every published checkpoint whole.
`manifest.json` (size and sha256 of every file) is written after the data; resuming takes the
newest checkpoint whose files match it and falls back to the one before with a warning. Older
checkpoints are deleted only after a newer one is published, keeping the newest `keep`. An
FSDP-sharded model is gathered to full tensors first (same files).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from sparsefit.atomic import crash_point, discard_dir, sha256_file, staging_dir
from sparsefit.errors import SparsefitError, first_line
from sparsefit.models.finite import refuse_non_finite, refuse_non_finite_input
from sparsefit.training import sharding

TRAINER_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
EXTRA_FILE = "extra.safetensors"
_STEP_DIR = re.compile(r"step-(\d{8})")


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


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _write_manifest(folder: Path) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2) + "\n")


def damage(folder: str | os.PathLike) -> str | None:
    """Why a checkpoint folder cannot be trusted (a missing or mismatched file), or None when it is whole."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest"
    if TRAINER_FILE not in files or "model.safetensors" not in files:
        return "manifest lists no trainer state or weights"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {entry['bytes']}"
        if sha256_file(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def published_steps(root: str | os.PathLike) -> list[int]:
    """Steps of the checkpoint folders under `root`, newest first (whole or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [int(m[1]) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(steps, reverse=True)


def find_checkpoint(root: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest whole checkpoint under `root` (None when there is none) and one warning per
    newer checkpoint skipped as damaged. Damaged folders are left in place, never deleted here."""
    warnings = []
    for step in published_steps(root):
        folder = checkpoint_dir(root, step)
        why = damage(folder)
        if why is None:
            return folder, warnings
        warnings.append(f"checkpoint {folder} is damaged ({why}); skipping it")
    return None, warnings


def save_training_state(
    root: str | os.PathLike,
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer: dict,
    write: bool = True,
    keep: int = 2,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Publish `root/step-NNNNNNNN` (the step is `trainer["step"]`), then keep only the newest `keep`.

    Every rank calls this (an FSDP model is gathered collectively); only the one with `write` saves.
    `extra` holds other tensors the run needs to resume (an adaptive mask's statistics).
    """
    sharded = sharding.is_sharded(model)
    weights = sharding.model_state(model) if sharded else None
    optim = sharding.optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
    final = checkpoint_dir(root, trainer["step"])
    if not write:
        return final
    tensors, groups = _optimizer_to_flat(optim)
    written = [*(weights if sharded else model.state_dict()).items(), *(extra or {}).items(), *tensors.items()]
    refuse_non_finite(written, f"cannot write checkpoint {final}", "lower the learning rate and resume")
    with staging_dir(final, label="checkpoint") as stage:
        crash_point("checkpoint:begin")
        if sharded:
            save_file(_unshared(weights), str(stage / "model.safetensors"))
        else:
            save_model(model, str(stage / "model.safetensors"))  # handles tied embeddings
        crash_point("checkpoint:mid-data")
        if masks:
            save_file(masks, str(stage / "masks.safetensors"))
        if extra:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(stage / EXTRA_FILE))
        save_file(tensors, str(stage / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(stage / "rng.safetensors"))
        meta = {"trainer": trainer, "optimizer_groups": groups, "scheduler": scheduler.state_dict()}
        (stage / TRAINER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _write_manifest(stage)  # last: a folder with a matching manifest holds every file whole
    for step in published_steps(root)[keep:]:
        if step < trainer["step"]:
            discard_dir(checkpoint_dir(root, step))
    crash_point("checkpoint:pruned")
    return final


def read_trainer_state(folder: str | os.PathLike) -> dict:
    """The `trainer` record (step, tokens, fingerprint) of a whole checkpoint."""
    return json.loads((Path(folder) / TRAINER_FILE).read_text())["trainer"]


_DAMAGED = "the checkpoint is damaged: delete it to resume from an earlier one, or start afresh"


def load_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict, dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """Restore model, optimizer, scheduler and RNG in place from one checkpoint folder (see
    `find_checkpoint`); returns (trainer state, masks or None, extra tensors)."""
    path = Path(path)
    meta = json.loads((path / TRAINER_FILE).read_text())
    device = next(model.parameters()).device
    try:
        if sharding.is_sharded(model):  # every rank reads the full tensors and keeps its shard
            full = load_file(str(path / "model.safetensors"), device=str(device))
            refuse_non_finite_input(full, path / "model.safetensors", _DAMAGED)
            sharding.load_model_state(model, full)
            tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
            sharding.load_optimizer_state(model, optimizer, _optimizer_from_flat(tensors, meta["optimizer_groups"]))
        else:
            load_model(model, str(path / "model.safetensors"), device=str(device))
            tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
            optimizer.load_state_dict(_optimizer_from_flat(tensors, meta["optimizer_groups"]))
    except (RuntimeError, ValueError, KeyError) as err:  # shapes or parameter groups of another model
        raise SparsefitError(
            f"checkpoint {path} does not fit this model and optimizer ({first_line(err, 160)})"
        ) from None
    if not sharding.is_sharded(model):  # the sharded path tested the full tensors before sharding them
        refuse_non_finite_input(model.named_parameters(), path / "model.safetensors", _DAMAGED)
    refuse_non_finite_input(tensors, path / "optimizer.safetensors", _DAMAGED)
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    masks_file = path / "masks.safetensors"
    masks = load_file(str(masks_file)) if masks_file.is_file() else None
    extra = load_file(str(path / EXTRA_FILE)) if (path / EXTRA_FILE).is_file() else {}
    return meta["trainer"], masks, extra
