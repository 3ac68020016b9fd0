"""Run by test_distributed under `torchrun --nproc_per_node=2`: one adaptive sparse training run
(Wanda masks updated every 2 steps, SR-STE, SLoRB) under DDP and under FSDP, into OUT/<strategy>."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sparsefit.training import FinetuneConfig, finetune
from tests.conftest import tiny_model, tiny_tokenizer


def main(out: Path) -> None:
    tokenizer = tiny_tokenizer()
    cfg = FinetuneConfig(
        dataset="gsm8k", format="plain", seq_len=64, batch_size=1, grad_accum=2, max_steps=5, lr=1e-2,
        bf16="false", method="ast",
        ast={"mask_every": 2, "mask_metric": "wanda", "stats_batches": 2, "srste_decay": 1e-3, "slorb": True},
    )  # fmt: skip
    for strategy in ("ddp", "fsdp"):  # same seed on every rank: identical starting weights
        finetune(
            tiny_model("llama"),
            tokenizer,
            cfg.model_copy(update={"strategy": strategy}),
            out / strategy,
            progress=False,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
