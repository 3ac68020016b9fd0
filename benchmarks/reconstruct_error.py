"""Layer reconstruction error of Wanda / SparseGPT masks before and after `reconstruct`, on the
embedded model's real Hessians: tr(dW H dW^T) per linear, relative to the method's own weights,
for several conjugate-gradient step counts and for the exact per-row solve.

Blocks are fed dense outputs of earlier blocks (only the layer problem is measured here, not the
pipeline). Run it alone; it writes JSON:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/reconstruct_error.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from environment import environment
from sparsefit.atomic import write_json
from sparsefit.data import load_texts, sample_calibration
from sparsefit.models import load_model_and_tokenizer
from sparsefit.models.layout import decoder_layout, select_linears, weight_as_out_in
from sparsefit.pruning.pipeline import BlockRunner, capture_block_inputs
from sparsefit.pruning.reconstruct import reconstruct
from sparsefit.pruning.sparsegpt import sparsegpt
from sparsefit.pruning.stats import InputStats
from sparsefit.pruning.structure import Structure
from sparsefit.pruning.wanda import prune_wanda


def exact(weight: torch.Tensor, keep: torch.Tensor, H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Direct solve of H_KK w'_K = (H w)_K in float64, one row at a time."""
    Hd = H.double()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    rhs = weight.double() @ Hd
    out = torch.zeros_like(weight, dtype=torch.float64)
    for r in range(weight.shape[0]):
        k = keep[r].nonzero().squeeze(1)
        out[r, k] = torch.linalg.solve(Hd[k][:, k], rhs[r, k])
    return out.float()


def loss(weight: torch.Tensor, other: torch.Tensor, H: torch.Tensor) -> float:
    d = weight - other
    return float(((d @ H) * d).sum())


def measure_layer(
    name: str, W: torch.Tensor, stats: InputStats, structure: str, iters: list[int], ranks: list[int]
) -> list[dict]:
    """One row per method: its loss, and the loss ratio after each step count (per preconditioner
    rank: key `cg{steps}` for rank 16, the default, `cg{steps}-r{rank}` for others) and after the exact solve."""
    H, nm = stats.hessian(name), Structure.parse(structure)
    masks = {"wanda": prune_wanda(W, stats.sq_sum(name), 0.5, nm), "sparsegpt": sparsegpt(W, H, 0.5, nm)}
    rows = []
    for method, (pruned, keep) in masks.items():
        base = loss(W, pruned, H)
        row = {"layer": name, "structure": structure, "method": method, "loss": base}
        for rank in ranks:
            for n in iters:
                t = time.perf_counter()
                refit = reconstruct(W, pruned, keep, H, iters=n, rank=rank)
                key = f"cg{n}" if rank == 16 else f"cg{n}-r{rank}"
                row[key] = {"ratio": loss(W, refit, H) / base, "seconds": time.perf_counter() - t}
        row["exact"] = {"ratio": loss(W, exact(W, keep, H), H) / base}
        print(f"{name} {structure} {method}: " + ", ".join(
            f"{k} {v['ratio']:.3f}" for k, v in row.items() if isinstance(v, dict)
        ), flush=True)  # fmt: skip
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per method and structure: summed refit loss over the layers / summed loss of the method's weights."""
    sums: dict[str, dict[str, float]] = {}
    for row in rows:
        acc = sums.setdefault(f"{row['method']} {row['structure']}", {"method": 0.0})
        acc["method"] += row["loss"]
        for k, v in row.items():
            if isinstance(v, dict):
                acc[k] = acc.get(k, 0.0) + v["ratio"] * row["loss"]
    return {key: {k: v / s["method"] for k, v in s.items() if k != "method"} for key, s in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 3, 6, 9])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--structures", nargs="+", default=["2:4", "unstructured"])
    parser.add_argument("--iters", type=int, nargs="+", default=[3, 4, 5, 10, 20, 40])
    parser.add_argument(
        "--ranks", type=int, nargs="+", default=[0, 16], help="preconditioner ranks (0: diag(H) alone; 16: default)"
    )
    parser.add_argument("--out", default="benchmarks/results/reconstruct_error.json")
    args = parser.parse_args()
    env = environment()  # at the start: the code that measures is the code recorded

    model, tok = load_model_and_tokenizer(args.model, "float32", "cpu")
    calib = sample_calibration(tok, load_texts("gsm8k", "train"), args.num_samples, args.seq_len, 0)
    layout = decoder_layout(model)
    inputs = capture_block_inputs(model, layout, calib, 4, torch.device("cpu"))
    runner = BlockRunner(torch.device("cpu"))
    rows = []
    for b in range(max(args.blocks) + 1):
        block = layout.blocks[b]
        layers = select_linears(block, f"{layout.prefix}.{b}", None, None)
        with InputStats(layers, sq_sum=True, hessian=True) as stats:
            runner.run(block, inputs, stats.end_forward, replace=True)  # dense outputs feed the next block
        if b in args.blocks:
            for name, module in layers.items():
                for structure in args.structures:
                    rows += measure_layer(name, weight_as_out_in(module), stats, structure, args.iters, args.ranks)
    result = {
        "benchmark": "reconstruct_error",
        "environment": env,
        "model": args.model,
        "calibration": f"gsm8k train {args.num_samples} x {args.seq_len}, seed 0",
        "blocks": args.blocks,
        "summary_loss_ratio": summarize(rows),  # sum over the layers of the refit loss / the method's loss
        "layers": rows,
    }
    write_json(Path(args.out), result)
    print(json.dumps(result["summary_loss_ratio"], indent=2))


if __name__ == "__main__":
    main()
