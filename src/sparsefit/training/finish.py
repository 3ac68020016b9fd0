"""The end of a fine-tune: check the trained model, merge adapters, and publish the final HF
checkpoint (with `metrics.json` and the log) in place of the training folder in one exchange."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from sparsefit.atomic import foreign_entries
from sparsefit.errors import SparsefitError, UsageError
from sparsefit.models.slorb import slorb_info
from sparsefit.pruning.oneshot import peak_rss_mb
from sparsefit.training.adapters.finetune import finish_adapters
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.distributed import all_reduce_sum, barrier
from sparsefit.training.log import LOG_FILE
from sparsefit.training.mask_steps import masks_of_copy, weight_sparsity
from sparsefit.training.resume import CHECKPOINTS_DIR, METRICS_FILE, non_finite, params_finite, write_checkpoint
from sparsefit.training.sharding import filled, model_state
from sparsefit.training.state import checkpoint_dir
from sparsefit.training.trackers import TRACKING_DIR

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sparsefit.training.run import Run


def finish(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig,
    output_dir: Path,
    run: Run,
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
    if not params_finite(model, run):
        raise non_finite(run.steps - 1, float("nan"), output_dir, "a parameter")
    foreign = foreign_entries(output_dir) if run.info.main else []
    (blocked,) = all_reduce_sum([float(len(foreign))], run.info, run.device)
    if blocked:  # keep the trained state, then ask for the folder to be cleared
        write_checkpoint(output_dir, model, config, run, run.steps, tokens)
        raise UsageError(
            f"'{output_dir}' now holds files sparsefit did not write ({', '.join(foreign[:3])}); the trained "
            f"state is in {checkpoint_dir(output_dir / CHECKPOINTS_DIR, run.steps)}: move those files out and "
            "rerun with --resume to write the final model"
        )
    for_inference(model, config)
    masks = run.masks
    if run.fsdp and run.adapters is not None:  # every rank gathers; rank 0 merges in its whole copy
        keep = masks.state_dict() if masks is not None else None
        weights = model_state(model)
        if run.info.main:
            whole = for_inference(filled(run.skeleton, weights), config)
            masks = None if keep is None else masks_of_copy(run.masks, keep, model, whole)
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
            carry=(LOG_FILE, TRACKING_DIR),
            state_dict=weights,
            label="final",
        )
    barrier(run.info)


def run_metrics(
    model: PreTrainedModel,
    config: FinetuneConfig,
    run: Run,
    resumed_from: int | None,
    tokens: int,
    train_seconds: float,
    run_tokens: int,
    final_loss: float,
    initial_sparsity: float,
) -> dict:
    """The metrics of a run that completed its steps (`metrics.json`). `train_seconds` and `run_tokens`
    count this invocation only (after a resume), `tokens` the whole run."""
    return {
        "completed": True,
        "steps": run.steps,
        "resumed_from": resumed_from,
        "tokens": tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": run_tokens / train_seconds if train_seconds else None,
        "checkpoint_seconds": run.checkpoint_seconds,
        "checkpoints": run.checkpoints,
        "final_loss": final_loss,
        "bf16": run.bf16,
        "world_size": run.info.world,
        "strategy": "fsdp" if run.fsdp else "ddp" if run.info.enabled else "single process",
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


def for_inference(model: PreTrainedModel, config: FinetuneConfig) -> PreTrainedModel:
    """Undo what training set on the model: train mode, gradient checkpointing, no KV cache."""
    model.train(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    return model
