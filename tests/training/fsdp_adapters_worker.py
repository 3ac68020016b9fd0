"""Run by test_distributed under `torchrun --nproc_per_node=2`: adapters on a sparse model under DDP
and under FSDP (row deltas chosen by taylor, merged and unmerged; LoRA with a masked merge). The
FSDP row run is killed after its step-2 checkpoint and resumed.

Each run writes its checkpoint and train_log.jsonl under OUT/<peft>-<strategy>; the test compares them.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sparsefit.errors import UsageError
from sparsefit.training import FinetuneConfig, finetune
from tests.conftest import tiny_tokenizer
from tests.training.fsdp_worker import killed_after_step_2, sparse_model

RUNS = {
    "rows": ("rows", {"rank": 3, "criterion": "taylor", "importance_batches": 2}),
    "rows-unmerged": ("rows", {"rank": 3, "criterion": "l2", "merge": "none"}),
    "lora": ("lora", {"rank": 2}),
}


def main(out: Path) -> None:
    tokenizer = tiny_tokenizer()
    for name, (peft, adapter) in RUNS.items():
        cfg = FinetuneConfig(
            dataset="gsm8k", format="plain", seq_len=64, batch_size=1, grad_accum=2, max_steps=4, lr=1e-2,
            bf16="false", checkpoint_every=2, peft=peft, adapter=adapter, gradient_checkpointing=True,
        )  # fmt: skip
        finetune(sparse_model(tokenizer), tokenizer, cfg, out / f"{name}-ddp", progress=False)
        fsdp = cfg.model_copy(update={"strategy": "fsdp"})
        if name == "lora":  # a 4-bit base is refused under FSDP, by name
            quantized = fsdp.model_copy(update={"adapter": fsdp.adapter.model_copy(update={"base_bits": 4})})
            try:
                finetune(sparse_model(tokenizer), tokenizer, quantized, out / "qlora-fsdp", progress=False)
            except UsageError as err:
                (out / f"qlora-fsdp-{dist.get_rank()}.txt").write_text(str(err))
        if name != "rows":
            finetune(sparse_model(tokenizer), tokenizer, fsdp, out / f"{name}-fsdp", progress=False)
            continue
        killed_after_step_2(lambda cfg=fsdp: finetune(sparse_model(tokenizer), tokenizer, cfg, out / "rows-fsdp"))
        finetune(sparse_model(tokenizer), tokenizer, fsdp, out / f"{name}-fsdp", resume=True, progress=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
