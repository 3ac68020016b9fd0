"""One-shot pruning benchmark on the embedded model: time, peak RSS, sparsity, WikiText-2 ppl.

Every run is a fresh `sparsefit prune` process (so its peak RSS is its own), followed by
`sparsefit eval` on the output. A run without `--preset` measures the defaults; `-paper` runs
the paper-faithful preset, `-inmemory` keeps everything in memory (no offload), `-damp1` the
best preset with the paper's 1% dampening. The yardstick,
measured in the same invocation before and again after the runs, is one plain dense float32
forward over the same calibration set (64 x 512 from GSM8K train, batches of 8); the ratios are to the mean of the two.
Run it with nothing else on the machine:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/oneshot.py --seeds 0 1 2

On an AVX-512 machine, `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`
keeps torch, oneDNN and MKL to AVX2, as on a CPU without AVX-512 or native bf16 (auto then computes
in float32, the yardstick runs the same kernels); the JSON records the limits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from environment import environment
from sparsefit.atomic import write_json

RUNS = {
    "magnitude-50": ["--method", "magnitude", "--sparsity", "0.5"],
    "wanda-50": ["--method", "wanda", "--sparsity", "0.5"],
    "wanda-50-paper": ["--method", "wanda", "--sparsity", "0.5", "--preset", "paper"],
    "sparsegpt-50": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "sparsegpt-50-paper": ["--method", "sparsegpt", "--sparsity", "0.5", "--preset", "paper"],
    "sparsegpt-50-inmemory": ["--method", "sparsegpt", "--sparsity", "0.5", "--offload-dir", "none"],
    "sparsegpt-50-damp1": ["--method", "sparsegpt", "--sparsity", "0.5", "--damp", "0.01"],  # the paper's dampening
    "wanda-2:4": ["--method", "wanda", "--structure", "2:4"],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--structure", "2:4"],
    "sparsegpt-2:4-paper": ["--method", "sparsegpt", "--structure", "2:4", "--preset", "paper"],
    "sparsegpt-2:4-damp1": ["--method", "sparsegpt", "--structure", "2:4", "--damp", "0.01"],
    "wanda-50-owl": ["--method", "wanda", "--sparsity", "0.5", "--profile", "owl"],
    "sparsegpt-50-owl": ["--method", "sparsegpt", "--sparsity", "0.5", "--profile", "owl"],
    "wanda-70": ["--method", "wanda", "--sparsity", "0.7"],
    "wanda-70-owl": ["--method", "wanda", "--sparsity", "0.7", "--profile", "owl"],
    "sparsegpt-70": ["--method", "sparsegpt", "--sparsity", "0.7"],
    "sparsegpt-70-owl": ["--method", "sparsegpt", "--sparsity", "0.7", "--profile", "owl"],
}

YARDSTICK = """
import json, sys, time, torch
from sparsefit.data import load_texts, sample_calibration
from sparsefit.models import load_model_and_tokenizer
from sparsefit.pruning.oneshot import peak_rss_mb
device = torch.device(sys.argv[4])
model, tok = load_model_and_tokenizer(sys.argv[1], "float32", device)
calib = sample_calibration(tok, load_texts("gsm8k", "train"), int(sys.argv[2]), int(sys.argv[3]), 0)
with torch.no_grad():
    if device.type == "cuda":  # kernels load and the clock rises on a first pass, which is not timed
        model(input_ids=calib[:8].to(device), use_cache=False)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for batch in calib.split(8):
        model(input_ids=batch.to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": calib.numel(), "peak_rss_mb": peak_rss_mb()}))
"""


def sparsefit(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "sparsefit.cli", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"sparsefit {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def evaluate(model: str, work: Path, windows: int, device: str) -> dict:
    out = work / "eval.json"
    sparsefit(
        "eval",
        "--model",
        model,
        "--dataset",
        "wikitext2",
        "--seq-len",
        "2048",
        "--max-windows",
        str(windows),
        "--device",
        device,
        "--json",
        str(out),
    )
    return json.loads(out.read_text())


def prune_and_evaluate(args: argparse.Namespace, name: str, seed: int, work: Path, yard: float) -> dict:
    out, report_path = work / name.replace(":", "_"), work / "report.json"
    start = time.perf_counter()
    sparsefit(
        "prune", "--model", args.model, *(flag.format(work=work) for flag in RUNS[name]),
        *(["--compute-dtype", args.compute_dtype] if args.compute_dtype else []),
        "--calib", "gsm8k", "--num-samples", str(args.num_samples),
        "--seq-len", str(args.seq_len), "--seed", str(seed), "--device", args.device, "--output", str(out),
        "--json", str(report_path), "--overwrite",  # each seed replaces the last one's output
    )  # fmt: skip
    wall = time.perf_counter() - start
    report = json.loads(report_path.read_text())
    row = {
        "seed": seed,
        "ppl": evaluate(str(out), work, args.windows, args.device)["ppl"],
        "seconds": report["seconds"],
        "ratio_to_dense_forward": report["seconds"] / yard,
        "process_wall_seconds": wall,
        "peak_rss_mb": report["peak_rss_mb"],
        "process_peak_rss_mb": report["process_peak_rss_mb"],  # with loading and the save
        "sparsity": report["sparsity"]["overall"],
        "per_block_sparsity": report["sparsity"]["per_block"],
        "structure": report["structure"],
        "phases": report["phases"],
        "sequential": report["config"]["sequential"],
        "reconstruct_iters": report["config"]["reconstruct_iters"],
        "compute_dtype": report["compute_dtype"],
        "peak_gpu_mb": report.get("peak_gpu_mb"),
    }
    print(f"  {name} seed {seed}: ppl {row['ppl']:.2f} in {row['seconds']:.1f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--one-seed", nargs="*", default=[], help="runs measured on the first seed only")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="calibration draws; several give each one and the mean"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu | cuda: where pruning, the yardstick and the evaluation compute"
    )
    parser.add_argument(
        "--compute-dtype", default=None, help="prune with --compute-dtype (auto: bf16 only on a CPU with native bf16)"
    )
    parser.add_argument("--out", default="benchmarks/results/oneshot.json")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add the runs to --out (same settings); their ratios are to this invocation's own yardstick",
    )
    args = parser.parse_args()
    earlier = json.loads(Path(args.out).read_text()) if args.append else None
    result = {
        "benchmark": "oneshot",
        "environment": environment(args.device),
        "model": args.model,
        "calibration": f"gsm8k train {args.num_samples} x {args.seq_len}",
        "eval": f"wikitext2 test, {args.windows} windows of 2048",
        "seeds": args.seeds,
        "compute_dtype": args.compute_dtype or "auto",
        "runs": {},
    }

    if earlier is not None:
        mean = earlier["yardstick_dense_forward"]["seconds"]
        for row in earlier["runs"].values():
            row.setdefault("yardstick_seconds", mean)
        appended = {"environment": result["environment"], "runs": args.runs}
        result = {**earlier, "appended": [*earlier.get("appended", []), appended]}
        result["runs"] = dict(earlier["runs"])
    before = yardstick(args)
    if earlier is None:
        result["yardstick_dense_forward"] = before
    yard = before["seconds"]
    print(f"yardstick: dense fp32 forward over calibration set on {args.device} {yard:.3g} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if earlier is None:
            result["dense"] = {"ppl": evaluate(args.model, work, args.windows, args.device)["ppl"]}
            print(f"dense ppl {result['dense']['ppl']:.3f}", flush=True)
        for name in args.runs:
            seeds = args.seeds[:1] if name in args.one_seed else args.seeds
            rows = [prune_and_evaluate(args, name, seed, work, yard) for seed in seeds]
            row = dict(rows[0])
            if len(rows) > 1:  # the headline figures become means; each draw stays in `per_seed`
                for key in ("ppl", "seconds", "ratio_to_dense_forward", "process_wall_seconds"):
                    row[key] = statistics.fmean(r[key] for r in rows)
                row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rows)
                row["process_peak_rss_mb"] = max(r["process_peak_rss_mb"] for r in rows)
                row["ppl_stdev"] = statistics.stdev(r["ppl"] for r in rows)
                keep = ("ppl", "seconds", "ratio_to_dense_forward", "peak_rss_mb", "process_peak_rss_mb")
                row["per_seed"] = {str(r["seed"]): {k: r[k] for k in keep} for r in rows}
                row["seed"] = seeds
            result["runs"][name] = row
            print(
                f"{name:18s} ppl {row['ppl']:8.2f}  {row['seconds']:6.1f} s ({row['ratio_to_dense_forward']:.2f}x)  "
                f"rss {row['peak_rss_mb']:.0f} MB  sparsity {row['sparsity']:.4f}"
                + (f"  (mean of seeds {seeds}, stdev {row['ppl_stdev']:.2f})" if len(rows) > 1 else ""),
                flush=True,
            )
            write_json(args.out, result)  # each finished run is kept if a later one fails
    # The machine's speed drifts over a long benchmark: the ratios are to the mean of a yardstick
    # measured before and one measured after the runs.
    after = yardstick(args)
    mean = (before["seconds"] + after["seconds"]) / 2
    yard = {**before, "seconds": mean, "before": before, "after": after}
    if earlier is None:
        result["yardstick_dense_forward"] = yard
    else:
        result["appended"][-1]["yardstick_dense_forward"] = yard
    print(f"yardstick after the runs {after['seconds']:.1f} s; ratios below are to the mean {mean:.1f} s", flush=True)
    for name in args.runs:
        row = result["runs"][name]
        row["yardstick_seconds"] = mean
        for r in [row, *row.get("per_seed", {}).values()]:
            r["ratio_to_dense_forward"] = r["seconds"] / mean
        print(f"{name:18s} {row['seconds']:6.1f} s ({row['ratio_to_dense_forward']:.2f}x)", flush=True)
    write_json(args.out, result)


def yardstick(args: argparse.Namespace) -> dict:
    """One plain dense float32 forward over the calibration set, in its own process."""
    proc = subprocess.run(
        [sys.executable, "-c", YARDSTICK, args.model, str(args.num_samples), str(args.seq_len), args.device],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
