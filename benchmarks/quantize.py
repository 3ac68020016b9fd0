"""Mask-preserving quantization benchmark on the embedded model: prune, quantize, export, reload, evaluate.

The model is pruned once (`sparsefit prune`, defaults: SparseGPT 50%), then each run is a fresh
`sparsefit quantize` process writing a compressed-tensors checkpoint, which `sparsefit eval` loads
through transformers (and compressed-tensors) for its WikiText-2 perplexity. Recorded per run: the
quantization's time as a ratio to the yardstick (the dense float32 forward of `oneshot.py`,
measured before and after the runs), peak RSS, weights revived (must be 0), sparsity, bytes of
weights on disk and their ratio to a dense bf16 checkpoint. Run it with nothing else on the machine:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/quantize.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from environment import environment
from oneshot import evaluate, sparsefit, yardstick
from sparsefit.atomic import write_json

RUNS = {
    "w4a16-gptq": ["--scheme", "w4a16", "--method", "gptq"],
    "w4a16-rtn": ["--scheme", "w4a16", "--method", "rtn"],
    "w8a16-gptq": ["--scheme", "w8a16", "--method", "gptq"],
    "w8a8-int8-gptq": ["--scheme", "w8a8-int8", "--method", "gptq"],
    "w8a8-fp8-rtn": ["--scheme", "w8a8-fp8", "--method", "rtn"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--dense", action="store_true", help="also quantize the dense model with w4a16-gptq")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/quantize.json")
    args = parser.parse_args()
    result = {
        "benchmark": "quantize",
        "environment": environment(args.device),
        "model": args.model,
        "pruning": "sparsegpt 50% (defaults), calibration gsm8k train 64 x 512, seed 0",
        "calibration": f"gsm8k train {args.num_samples} x {args.seq_len}, seed 0",
        "eval": f"wikitext2 test, {args.windows} windows of 2048, the export loaded by transformers",
        "runs": {},
    }
    before = yardstick(args)
    print(f"yardstick: dense fp32 forward over calibration set {before['seconds']:.3g} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pruned = work / "pruned"
        sparsefit("prune", "--model", args.model, "--output", str(pruned), "--device", args.device)
        result["dense"] = {"ppl": evaluate(args.model, work, args.windows, args.device)["ppl"]}
        result["pruned"] = {"ppl": evaluate(str(pruned), work, args.windows, args.device)["ppl"]}
        print(f"dense ppl {result['dense']['ppl']:.2f}, pruned {result['pruned']['ppl']:.2f}", flush=True)
        jobs = [(name, str(pruned), RUNS[name]) for name in args.runs]
        if args.dense:
            jobs.append(("dense-w4a16-gptq", args.model, RUNS["w4a16-gptq"]))
        for name, source, flags in jobs:
            out, report_path = work / name, work / f"{name}.json"
            start = time.perf_counter()
            sparsefit(
                "quantize", "--model", source, *flags, "--num-samples", str(args.num_samples),
                "--seq-len", str(args.seq_len), "--device", args.device, "--output", str(out),
                "--json", str(report_path),
            )  # fmt: skip
            wall = time.perf_counter() - start
            report = json.loads(report_path.read_text())
            row = {
                "source": "dense" if source == args.model else "pruned",
                "ppl": evaluate(str(out), work, args.windows, args.device)["ppl"],
                "seconds": report["seconds"],
                "process_wall_seconds": wall,
                "peak_rss_mb": report["peak_rss_mb"],
                "revived_weights": report["revived_weights"],
                "sparsity_before": report["sparsity_before"],
                "sparsity_after": report["sparsity_after"],
                "format": report["export"]["format"],
                "weight_bytes": report["export"]["weight_bytes"],
                "ratio_to_dense_bf16": report["export"]["ratio_to_dense_bf16"],
                "phases": report["phases"],
            }
            result["runs"][name] = row
            print(
                f"{name:18s} ppl {row['ppl']:8.2f}  {row['seconds']:6.1f} s  revived {row['revived_weights']}  "
                f"{row['weight_bytes'] / 2**20:.1f} MiB ({row['ratio_to_dense_bf16']:.2f}x bf16)",
                flush=True,
            )
            write_json(args.out, result)
    after = yardstick(args)
    mean = (before["seconds"] + after["seconds"]) / 2
    result["yardstick_dense_forward"] = {**before, "seconds": mean, "before": before, "after": after}
    for row in result["runs"].values():
        row["ratio_to_dense_forward"] = row["seconds"] / mean
    write_json(args.out, result)
    print(f"yardstick mean {mean:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
