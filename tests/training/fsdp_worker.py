"""Run by test_distributed under `torchrun --nproc_per_node=2`: the same masked, gradually pruned
fine-tune under DDP and under FSDP (the FSDP one killed after its step-2 checkpoint and resumed).

Each run writes its checkpoint and train_log.jsonl under OUT/<name>; the test compares them.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.training import FinetuneConfig, GMPConfig, finetune
from tests.conftest import tiny_model, tiny_tokenizer


def sparse_model(tokenizer):
    model = tiny_model("llama")  # same seed on every rank: identical starting weights
    oneshot(model, tokenizer, OneShotConfig(method="magnitude", sparsity=0.5, calib=None), progress=False)
    return model


def killed_after_step_2(run) -> None:
    """Call `run` with the optimizer's third step raising KeyboardInterrupt (after the step-2 checkpoint)."""
    original, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        run()
    except KeyboardInterrupt:
        pass
    finally:
        torch.optim.AdamW.step = original
    assert calls["n"] == 3, "the FSDP run was not interrupted"


def main(out: Path) -> None:
    tokenizer = tiny_tokenizer()
    cfg = FinetuneConfig(
        dataset="gsm8k", format="plain", seq_len=64, batch_size=1, grad_accum=2, max_steps=4, lr=5e-3,
        bf16="false", weight_decay=0.1, checkpoint_every=2,
        gmp=GMPConfig(initial=0.5, final=0.6, start=0, end=2, every=1),
    )  # fmt: skip
    finetune(sparse_model(tokenizer), tokenizer, cfg, out / "ddp", progress=False)

    fsdp = cfg.model_copy(update={"strategy": "fsdp"})
    killed_after_step_2(lambda: finetune(sparse_model(tokenizer), tokenizer, fsdp, out / "fsdp", progress=False))
    finetune(sparse_model(tokenizer), tokenizer, fsdp, out / "fsdp", resume=True, progress=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
