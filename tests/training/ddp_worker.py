"""Run by test_distributed under `torchrun --nproc_per_node=2`: a masked fine-tune on the gloo backend.

Each rank writes a digest of its final weights and its mask check to OUT/rank-N.json.
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
    model = tiny_model("llama")  # same seed on every rank: identical starting weights
    oneshot(model, tokenizer, OneShotConfig(method="magnitude", sparsity=0.5, calib=None), progress=False)
    masks = SparsityMasks.from_zeros(model)
    cfg = FinetuneConfig(
        dataset="gsm8k", format="plain", seq_len=64, batch_size=2, max_steps=4, lr=5e-3, bf16="false", weight_decay=0.1
    )
    metrics = finetune(model, tokenizer, cfg, out / "run", progress=False)
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().numpy().tobytes())
    rank = dist.get_rank()
    pruned_nonzero = sum(int((m.weight[~k] != 0).sum()) for _, m, k in masks.items())
    (out / f"rank-{rank}.json").write_text(
        json.dumps({"digest": digest.hexdigest(), "pruned_nonzero": pruned_nonzero, "metrics": metrics})
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
