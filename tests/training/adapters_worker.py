"""Run by test_distributed under `torchrun --nproc_per_node=2`: adapters on a sparse model under DDP
(row deltas chosen by taylor, each rank on its own batches; LoRA with a masked merge).

Each rank writes a digest of its final (merged) weights and the run's metrics to OUT/rank-N.json.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.training import FinetuneConfig, SparsityMasks, finetune
from tests.conftest import tiny_model, tiny_tokenizer


def main(out: Path) -> None:
    tokenizer = tiny_tokenizer()
    result = {}
    for peft, adapter in (("rows", {"rank": 3, "criterion": "taylor", "importance_batches": 2}), ("lora", {"rank": 2})):
        model = tiny_model("llama")  # same seed on every rank: identical starting weights
        oneshot(model, tokenizer, OneShotConfig(method="magnitude", sparsity=0.5, calib=None), progress=False)
        masks = SparsityMasks.from_zeros(model)
        cfg = FinetuneConfig(
            dataset="gsm8k", format="plain", seq_len=64, batch_size=2, max_steps=3, lr=1e-2, bf16="false",
            peft=peft, adapter=adapter,
        )  # fmt: skip
        metrics = finetune(model, tokenizer, cfg, out / peft, progress=False)
        digest = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().numpy().tobytes())
        pruned_nonzero = sum(int((m.weight[~k] != 0).sum()) for _, m, k in masks.items())
        result[peft] = {"digest": digest.hexdigest(), "pruned_nonzero": pruned_nonzero, "metrics": metrics}
    (out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
