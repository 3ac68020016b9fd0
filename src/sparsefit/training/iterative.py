"""Iterative pruning: prune a little, recover, prune more (e.g. 0.3 -> 0.5 -> 0.7).

Each cycle re-runs one-shot pruning with `preserve_mask`, so weights pruned in an earlier
cycle stay pruned, then fine-tunes with the new masks. Cycle k writes `output/cycle-k`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from sparsefit.atomic import make_dir, mark
from sparsefit.errors import UsageError
from sparsefit.outputs import claim_output, is_main_process
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.loop import finetune

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def iterative_prune_finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sparsities: list[float],
    prune: OneShotConfig,
    train: FinetuneConfig,
    output_dir: str | Path,
    teacher: PreTrainedModel | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[dict]:
    """One (prune report, finetune metrics) record per cycle; the model ends at the last sparsity.

    `overwrite` replaces the cycle folders of an earlier run in `output_dir`."""
    if sorted(sparsities) != list(sparsities) or not sparsities:
        raise UsageError(f"--cycles must be increasing sparsities, e.g. 0.3,0.5,0.7 (got {sparsities})")
    if train.method == "ast":
        raise UsageError("--cycles prunes step by step with fixed masks; --method ast trains its own N:M masks")
    if train.peft != "none" and train.adapter.merge == "none":
        raise UsageError("--cycles prunes the merged model of each cycle: drop --merge none")
    if train.strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # each cycle prunes the whole model between fine-tunes; FSDP leaves it sharded after the first
        raise UsageError("iterative cycles need the whole model on every process: use --strategy ddp with --cycles")
    source = getattr(model.config, "name_or_path", None)
    with claim_output(output_dir, overwrite=overwrite, inputs=(source,)) as claim:
        if is_main_process():
            make_dir(claim.path)
            mark(claim.path, *(f"cycle-{k}" for k in range(len(sparsities))))
        cycles = []
        for k, sparsity in enumerate(sparsities):
            cfg = prune.model_copy(update={"sparsity": sparsity, "preserve_mask": True})
            report = oneshot(model, tokenizer, cfg, device=device, progress=progress)
            metrics = finetune(
                model,
                tokenizer,
                train.model_copy(update={"masks": "zeros"}),
                claim.path / f"cycle-{k}",
                teacher=teacher,
                progress=progress,
                device=device,
                overwrite=overwrite,
            )
            cycles.append({"sparsity": sparsity, "prune": report.to_json(), "finetune": metrics})
        return cycles
