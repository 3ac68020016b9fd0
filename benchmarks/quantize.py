"""Mask-preserving quantization benchmark on the embedded model, with llm-compressor side by side.

Two sources: the dense builtin model and its 50% SparseGPT prune (`sparsefit prune` defaults).
Each run is a fresh `sparsefit quantize` process writing a compressed-tensors checkpoint (or
llm-compressor 0.14's GPTQModifier, in its own virtual environment, on the same calibration
windows and the same groups), then the export is loaded back through transformers and scored:

- GSM8K answer perplexity: teacher-forced, the first 200 rows of GSM8K test (held out: the
  calibration is drawn from GSM8K train);
- WikiText-2 perplexity over the first 8 windows of 2048 tokens (the windows the defaults were
  chosen on) and over the next 8 (never looked at while choosing);
- pruned weights revived (must be 0 for sparsefit), sparsity, bytes on disk, time, peak RSS.

Times are ratios to the yardstick of `oneshot.py` (a dense float32 forward over the calibration
set), measured before and after the runs. llm-compressor needs its own venv (its pins conflict):

    python -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/quantize.py --lc-python /tmp/lcvenv/bin/python

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from environment import environment
from oneshot import sparsefit, yardstick
from reference_llmcompressor import run_llmcompressor, save_calibration, worker
from sparsefit.atomic import write_json

# name -> (sources it runs on, `sparsefit quantize` flags; None: llm-compressor's GPTQModifier)
RUNS: dict[str, tuple[tuple[str, ...], list[str] | None]] = {
    "w4a16": (("dense", "pruned"), ["--scheme", "w4a16"]),  # the defaults: GPTQ, act-order, mse scales
    "w4a16-gptq-minmax": (("dense",), ["--scheme", "w4a16", "--observer", "minmax"]),
    "w4a16-gptq-plain": (("dense", "pruned"), ["--scheme", "w4a16", "--actorder", "none", "--observer", "minmax"]),
    "w4a16-rtn": (("dense", "pruned"), ["--scheme", "w4a16", "--method", "rtn", "--observer", "minmax"]),
    "w4a16-rtn-mse": (("dense", "pruned"), ["--scheme", "w4a16", "--method", "rtn"]),
    "w4a16-llmcompressor": (("dense", "pruned"), None),
    "w8a16": (("pruned",), ["--scheme", "w8a16"]),
    "w8a8-int8": (("pruned",), ["--scheme", "w8a8-int8"]),
    "w8a8-fp8-rtn": (("pruned",), ["--scheme", "w8a8-fp8", "--method", "rtn"]),
}

# llm-compressor's GPTQ, W4A16 in groups of 64 (what sparsefit picks for 576-column layers; it
# refuses groups that do not divide a layer), its other settings left at their defaults.
GPTQ_W4A16 = """
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor.modifiers.quantization import GPTQModifier
weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
modifier = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                        ignore=["lm_head"])
report = lambda: {"actorder": str(modifier.actorder), "dampening_frac": modifier.dampening_frac}
"""


def score(path: str, windows: int, answer_rows: int, zeros_of: str | None = None) -> dict:
    """The export at `path` loaded through transformers: GSM8K answer ppl, WikiText-2 ppl over the
    first `windows` windows and over the next `windows`, and (given the float source `zeros_of`)
    how many of the source's zero weights are nonzero in it."""
    from sparsefit.evaluation.gsm8k import evaluate_answer_ppl
    from sparsefit.evaluation.perplexity import nll_sum, stream_windows
    from sparsefit.evaluation.tasks import tokenize_for_perplexity
    from sparsefit.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(path, "float32", "cpu")
    model.eval()
    stream = tokenize_for_perplexity(tok, "wikitext2", "test", "text")  # as `sparsefit eval` reads it
    nll = [nll_sum(model, w[None])[0].item() for w in stream_windows(stream, 2048, 2 * windows)]
    per_token = [n / 2047 for n in nll]
    row = {
        "wikitext_ppl_first": math.exp(sum(per_token[:windows]) / windows),
        "wikitext_ppl_other": math.exp(sum(per_token[windows:]) / windows),
        "gsm8k_answer_ppl": evaluate_answer_ppl(model, tok, limit=answer_rows, progress=False)["ppl"],
    }
    if zeros_of is not None:
        source, _ = load_model_and_tokenizer(zeros_of, "float32", "cpu")
        reference = dict(source.named_parameters())
        revived = total = 0
        for name, p in model.named_parameters():
            if p.dim() == 2 and name in reference and "embed" not in name and "lm_head" not in name:
                zero = reference[name] == 0
                revived += int((zero & (p != 0)).sum())
                total += int(zero.sum())
        row["revived_weights"], row["source_zeros"] = revived, total
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--sources", nargs="+", default=["dense", "pruned"], choices=["dense", "pruned"])
    parser.add_argument("--lc-python", help="python of a virtual environment with llmcompressor (else no such runs)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="WikiText windows of 2048 per half (first, other)")
    parser.add_argument("--answer-rows", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/quantize.json")
    args = parser.parse_args()
    from sparsefit.models.loading import resolve_model

    source_dir = resolve_model(args.model).path
    result = {
        "benchmark": "quantize",
        "environment": environment("cpu"),
        "model": args.model,
        "pruning": "sparsegpt 50% (sparsefit prune defaults), calibration gsm8k train 64 x 512, seed 0",
        "calibration": f"gsm8k train {args.num_samples} x {args.seq_len}, seed 0 (the same windows for both tools)",
        "eval": f"export reloaded by transformers; GSM8K answer ppl over the first {args.answer_rows} test rows; "
        f"WikiText-2 test ppl over windows 1-{args.windows} (first) and {args.windows + 1}-{2 * args.windows} "
        "(other) of 2048 tokens",
        "sources": {},
        "runs": {},
    }
    if args.lc_python:
        version = run_llmcompressor([args.lc_python, "-c", "import llmcompressor; print(llmcompressor.__version__)"])
        result["llmcompressor"] = version.split()[-1]
    before = yardstick(argparse.Namespace(model=args.model, num_samples=args.num_samples, seq_len=args.seq_len,
                                          device="cpu"))  # fmt: skip
    print(f"yardstick: dense fp32 forward over calibration set {before['seconds']:.3g} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = work / "calib.safetensors"
        save_calibration(args.model, 0, args.num_samples, args.seq_len, calib)
        sources = {"dense": str(source_dir), "pruned": str(work / "pruned")}
        if "pruned" in args.sources:
            sparsefit("prune", "--model", args.model, "--output", sources["pruned"], "--device", "cpu")
        for name in args.sources:
            result["sources"][name] = score(sources[name], args.windows, args.answer_rows)
            print(f"{name:7s} float {json.dumps(result['sources'][name])}", flush=True)
        for source in args.sources:
            for name in args.runs:
                on, flags = RUNS[name]
                if source not in on or (flags is None and not args.lc_python):
                    continue
                out = work / f"{source}-{name}"
                start = time.perf_counter()
                if flags is None:
                    row = {"tool": "llm-compressor", **worker(args.lc_python, GPTQ_W4A16, sources[source], calib, out)}
                else:
                    report_path = work / f"{source}-{name}.json"
                    sparsefit(
                        "quantize", "--model", sources[source], *flags, "--num-samples", str(args.num_samples),
                        "--seq-len", str(args.seq_len), "--device", "cpu", "--output", str(out),
                        "--json", str(report_path),
                    )  # fmt: skip
                    report = json.loads(report_path.read_text())
                    row = {
                        "tool": "sparsefit",
                        "flags": flags,
                        "seconds": report["seconds"],
                        "peak_rss_mb": report["peak_rss_mb"],
                        "revived_weights_reported": report["revived_weights"],
                        "sparsity_before": report["sparsity_before"],
                        "sparsity_after": report["sparsity_after"],
                        "group_size": report["group_size"],
                        "weight_bytes": report["export"]["weight_bytes"],
                        "ratio_to_dense_bf16": report["export"]["ratio_to_dense_bf16"],
                    }
                row["process_wall_seconds"] = time.perf_counter() - start
                row.update(
                    score(str(out), args.windows, args.answer_rows, sources[source] if source == "pruned" else None)
                )
                float_row = result["sources"][source]
                for key in ("gsm8k_answer_ppl", "wikitext_ppl_first", "wikitext_ppl_other"):
                    row[f"{key}_vs_float"] = row[key] / float_row[key]
                result["runs"][f"{source}/{name}"] = row
                print(
                    f"{source}/{name:22s} answer ppl {row['gsm8k_answer_ppl']:.3f}  "
                    f"wiki {row['wikitext_ppl_first']:.2f} / {row['wikitext_ppl_other']:.2f}  "
                    f"revived {row.get('revived_weights', '-')}  {row['seconds']:.0f} s",
                    flush=True,
                )
                write_json(args.out, result)
    after = yardstick(argparse.Namespace(model=args.model, num_samples=args.num_samples, seq_len=args.seq_len,
                                         device="cpu"))  # fmt: skip
    mean = (before["seconds"] + after["seconds"]) / 2
    result["yardstick_dense_forward"] = {**before, "seconds": mean, "before": before, "after": after}
    for row in result["runs"].values():
        row["ratio_to_dense_forward"] = row["seconds"] / mean
    write_json(args.out, result)
    print(f"yardstick mean {mean:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
