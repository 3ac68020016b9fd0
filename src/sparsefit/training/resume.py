"""A fine-tune's output folder while it trains: what a resumed run must share with the run that wrote
the checkpoint (its fingerprint), the folder's preparation, the periodic checkpoints and the restore
from the newest whole one, and the errors that point at the last good checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sparsefit.atomic import clean_stale_in, discard_dir, is_empty_dir, make_dir, mark, read_marker
from sparsefit.errors import SparsefitError, UsageError
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.distributed import all_reduce_sum, barrier
from sparsefit.training.log import LOG_FILE
from sparsefit.training.masks import SparsityMasks, decoder_linears
from sparsefit.training.sharding import local
from sparsefit.training.state import (
    checkpoint_dir,
    find_checkpoint,
    load_training_state,
    published_steps,
    read_trainer_state,
    save_training_state,
)
from sparsefit.training.trackers import TRACKING_DIR, claim_tracking_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from sparsefit.training.run import Run

CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
# Options that change neither the trajectory nor the result: a resumed run may change them.
BOOKKEEPING = {"checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "log_every", "report_to"}


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


def checkpointed_rows(output_dir: Path) -> dict[str, torch.Tensor] | None:
    """The row adapters' rows in the newest whole checkpoint (None without one): a resumed run trains
    the rows it chose before instead of scoring the model again."""
    from safetensors import safe_open

    folder, _ = find_checkpoint(output_dir / CHECKPOINTS_DIR)
    if folder is None:
        return None
    suffix = ".row_delta.rows"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {key[: -len(suffix)]: f.get_tensor(key) for key in f.keys() if key.endswith(suffix)} or None


def check_resumable(output_dir: Path, resume: bool, overwrite: bool) -> None:
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


def prepare_output(output_dir: Path, fresh: bool, tracking: bool = False) -> None:
    """Mark the folder as sparsefit's; a fresh run drops what an earlier run left to resume from
    (an earlier final model stays until this run's replaces it). `tracking`: a tracker writes in
    TRACKING_DIR, which a fresh run starts anew as it does the log."""
    ours = (read_marker(output_dir) or {}).get("entries", [])
    make_dir(output_dir)
    if tracking:
        claim_tracking_dir(output_dir, fresh)
    mark(output_dir, CHECKPOINTS_DIR, LOG_FILE, METRICS_FILE)
    clean_stale_in(output_dir / CHECKPOINTS_DIR)  # a checkpoint a kill cut short
    if fresh:
        discard_dir(output_dir / CHECKPOINTS_DIR)
        for name in (LOG_FILE, METRICS_FILE):
            (output_dir / name).unlink(missing_ok=True)
        if TRACKING_DIR in ours:  # an earlier run's curves (only a folder sparsefit recorded writing)
            discard_dir(output_dir / TRACKING_DIR)


def restore(output_dir: Path, model: PreTrainedModel, run: Run) -> dict | None:
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


def params_finite(model: torch.nn.Module, run: Run) -> bool:
    bad = sum(0 if torch.isfinite(local(p.detach())).all() else 1 for p in model.parameters())
    (total,) = all_reduce_sum([float(bad)], run.info, run.device)
    return total == 0


def write_checkpoint(
    output_dir: Path, model: PreTrainedModel, config: FinetuneConfig, run: Run, step: int, tokens: int
) -> None:
    """Publish a checkpoint after `step` steps; a model with a non-finite parameter is never saved."""
    if not params_finite(model, run):
        raise non_finite(step - 1, float("nan"), output_dir, "a parameter")
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


def non_finite(step: int, value: float, output_dir: Path, what: str = "loss") -> SparsefitError:
    """The error of a non-finite loss, gradient norm or parameter, naming the last good checkpoint."""
    steps = published_steps(output_dir / CHECKPOINTS_DIR)  # each was checked finite before it was saved
    folder = checkpoint_dir(output_dir / CHECKPOINTS_DIR, steps[0]) if steps else None
    where = f"the last good checkpoint is {folder}; rerun with --resume" if folder else "no checkpoint was written yet"
    fix = "lower --lr" if what != "loss" else "lower --lr or enable clipping"
    return SparsefitError(f"{what} became {value} at step {step}; stopped without saving it ({where}), then {fix}")
