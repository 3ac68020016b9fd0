"""What crash-safe checkpoints cost: the sparse fine-tune of `benchmarks/recovery.py` (embedded model,
50% sparse student, dense teacher, CE + KL + square-head, GSM8K, batch 4) at its default checkpoint
interval, with every checkpoint written, fsync'ed, hashed into its manifest and published.

Overhead = time spent checkpointing / time spent training, in the same run; the benchmark also
times checking a checkpoint's manifest (what `--resume` does first). The student is pruned by
magnitude (instantly): the checkpoint's files do not depend on how the mask was chosen. Run it alone:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/checkpoint_overhead.py
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from environment import environment
from recovery import CHECKPOINT_EVERY
from sparsefit.atomic import write_json
from sparsefit.models import load_model_and_tokenizer
from sparsefit.models.offload import reuse_freed_memory
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.training import FinetuneConfig, SparsityMasks, finetune
from sparsefit.training.state import damage, save_training_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY)
    p.add_argument("--checkpoints", type=int, default=3, help="checkpoints to write (steps: this x interval + 1)")
    p.add_argument("--work", default="runs/bench-checkpoint")
    p.add_argument("--out", default="benchmarks/results/checkpoint_overhead.json")
    args = p.parse_args()
    reuse_freed_memory()  # as the CLI's training commands do
    work = Path(args.work)

    teacher, tok = load_model_and_tokenizer(args.model, "float32", "cpu")
    student = copy.deepcopy(teacher)
    oneshot(student, tok, OneShotConfig(method="magnitude", sparsity=0.5, calib=None), progress=False)
    steps = args.checkpoints * args.checkpoint_every + 1
    config = FinetuneConfig(
        dataset="gsm8k", format="plain", batch_size=4, lr=2e-4, ce_weight=1.0, kl_weight=3.0,
        square_head_weight=10.0, teacher="dense", max_steps=steps, checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=0,
    )  # fmt: skip
    metrics = finetune(student, tok, config, work / "run", teacher=teacher, overwrite=True, progress=False)

    # The run's checkpoints go with its final save; write one more of the same kind to time the
    # manifest check that `--resume` starts with.
    optimizer = torch.optim.AdamW(list(student.parameters()), lr=1e-4)
    for param in student.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # AdamW's moments exist, as in a real checkpoint
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    masks = SparsityMasks.from_zeros(student).state_dict()
    t = time.perf_counter()
    folder = save_training_state(work / "probe", student, masks, optimizer, scheduler, {"step": 1, "tokens": 0})
    write_seconds = time.perf_counter() - t
    t = time.perf_counter()
    assert damage(folder) is None
    check_seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in folder.iterdir())

    overhead = metrics["checkpoint_seconds"] / metrics["train_seconds"]
    result = {
        "benchmark": "checkpoint_overhead",
        "environment": environment(),
        "args": vars(args),
        "steps": metrics["steps"],
        "tokens": metrics["tokens"],
        "train_seconds": metrics["train_seconds"],
        "tokens_per_second": metrics["tokens_per_second"],
        "checkpoints": metrics["checkpoints"],
        "checkpoint_seconds": metrics["checkpoint_seconds"],
        "seconds_per_checkpoint": metrics["checkpoint_seconds"] / max(metrics["checkpoints"], 1),
        "overhead": overhead,
        "checkpoint_bytes": size,
        "probe_write_seconds": write_seconds,
        "probe_manifest_check_seconds": check_seconds,
    }
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "args")}, indent=2))


if __name__ == "__main__":
    main()
