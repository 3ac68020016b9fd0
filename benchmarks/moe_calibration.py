"""MoE calibration benchmark: each expert's statistics from its routed tokens, or from every token.

A tiny Mixtral-layout mixture of experts (8 experts, 2 per token) is trained from random init on
GSM8K train for a few hundred steps (so its routing is learned, not random), with a BPE tokenizer
trained on the same text. It is then pruned to 50% by SparseGPT and Wanda (default settings) with
expert statistics from the tokens the router sends each expert (`--expert-calibration routed`, the
default) and from every calibration token (`all`, as llm-compressor's `moe_calibrate_all_experts`).
Each model is evaluated by perplexity on GSM8K test text the calibration never saw. Run it alone:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/moe_calibration.py --out benchmarks/results/moe_calibration.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, MixtralConfig

from environment import environment
from sparsefit.atomic import write_json
from sparsefit.models.sparsity import measure_sparsity
from sparsefit.pruning import OneShotConfig, oneshot


def gsm8k_texts(split: str) -> list[str]:
    path = Path(os.environ.get("SPARSEFIT_DATA_DIR", "data")) / "gsm8k" / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


def token_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    return torch.tensor([i for t in texts for i in tok.encode(t).ids], dtype=torch.long)


def windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    n = stream.numel() // length
    return stream[: n * length].view(n, length)


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: torch.Tensor, batch: int = 16) -> float:
    total = count = 0
    for b in range(0, data.shape[0], batch):
        x = data[b : b + batch]
        logits = model(x).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def routing_share(model: torch.nn.Module, data: torch.Tensor) -> list[list[float]]:
    """Per block, the fraction of routed slots each expert takes on `data`."""
    shares = []
    hooks = []
    for layer in model.model.layers:

        def hook(module, args, out, store=shares):
            index = out[2]
            counts = torch.bincount(index.flatten(), minlength=module.num_experts).float()
            store.append((counts / counts.sum()).tolist())

        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    model(data)
    for h in hooks:
        h.remove()
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    torch.manual_seed(0)
    train_texts, test_texts = gsm8k_texts("train"), gsm8k_texts("test")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(train_texts, trainers.BpeTrainer(vocab_size=a.vocab, special_tokens=["<unk>"]))
    train = windows(token_stream(tok, train_texts), a.seq_len)
    test = windows(token_stream(tok, test_texts), a.seq_len)[: a.eval_windows]
    config = MixtralConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=a.seq_len, router_aux_loss_coef=0.01, output_router_logits=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=a.steps, pct_start=0.1)
    t = time.perf_counter()
    model.train()
    order = torch.randperm(train.shape[0])
    for step in range(a.steps):
        idx = order[(step * a.batch) % (order.numel() - a.batch) :][: a.batch]
        out = model(train[idx], labels=train[idx])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step} loss {out.loss.item():.3f}", flush=True)
    train_seconds = time.perf_counter() - t
    model.eval()
    model.config.output_router_logits = False
    calib = train[order[-a.calib_samples :]]  # train windows the last steps did not see first
    runs = {"dense": {"ppl": perplexity(model, test)}}
    print("dense", runs["dense"], flush=True)
    for method in ("sparsegpt", "wanda"):
        for arm in ("routed", "all"):
            pruned = copy.deepcopy(model)
            cfg = OneShotConfig(method=method, sparsity=0.5, calib="given", expert_calibration=arm, batch_size=16)
            t = time.perf_counter()
            report = oneshot(pruned, None, cfg, calib=calib, progress=False)
            runs[f"{method} {arm}"] = {
                "ppl": perplexity(pruned, test),
                "sparsity": report.sparsity.overall,
                "measured": measure_sparsity(pruned)["overall"],
                "starved_experts": len(report.sparsity.starved_experts),
                "seconds": time.perf_counter() - t,
            }
            print(method, arm, runs[f"{method} {arm}"], flush=True)
    result = {
        "environment": environment(),
        "args": vars(a),
        "train": {"steps": a.steps, "seconds": train_seconds, "params": sum(p.numel() for p in model.parameters())},
        "routing_share": routing_share(model, test[:32]),
        "runs": runs,
    }
    if a.out:
        write_json(a.out, result)
    print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
