"""The reference implementation on our exact calibration windows: llm-compressor's SparseGPT / Wanda
against `sparsefit prune`, same model, same 64 x 512 GSM8K windows, same WikiText-2 evaluation.

The one-shot targets quote llm-compressor's perplexities; a different calibration draw moves
SparseGPT 50% by about 2 ppl on this model, so the comparison that isolates the algorithm feeds
both tools the same token ids. llm-compressor lives in its own virtual environment (it pins its
own transformers), e.g.

    python -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/reference_llmcompressor.py --lc-python /tmp/lcvenv/bin/python

Run it alone: the times are reported too. Writes benchmarks/results/reference_llmcompressor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from environment import environment
from oneshot import RUNS as PRUNE_FLAGS  # sparsefit's side of each run, as benchmarks/oneshot.py prunes it
from oneshot import evaluate, sparsefit

RUNS = {  # name: (method, llm-compressor mask_structure)
    "sparsegpt-50": ("sparsegpt", "0:0"),
    "sparsegpt-2:4": ("sparsegpt", "2:4"),
    "wanda-50": ("wanda", "0:0"),
}

# Runs inside llm-compressor's environment: one oneshot pass of a modifier over the saved windows,
# then a checkpoint. argv: source, calibration file, output, then the modifier's own arguments;
# MODIFIER (python source) sets `modifier` from `args`, and may set `report`, more fields to print.
WORKER = """
import json, resource, sys, time
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot

source, calib, out, *args = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(source)
ids = load_file(calib)["input_ids"]
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
report = dict
MODIFIER
start = time.perf_counter()
oneshot(model=model, dataset=data, recipe=[modifier], num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
seconds = time.perf_counter() - start
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  **report()}))
"""

PRUNE = """
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
method, structure = args
kwargs = dict(sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
modifier = SparseGPTModifier(**kwargs) if method == "sparsegpt" else WandaPruningModifier(**kwargs)
"""


def worker(lc_python: str, modifier: str, source: str, calib: Path, out: Path, *args: str) -> dict:
    """Run WORKER with `modifier` in llm-compressor's python; its printed record."""
    script = WORKER.replace("MODIFIER", modifier.strip())
    stdout = run_llmcompressor([lc_python, "-c", script, source, str(calib), str(out), *args])
    return json.loads(stdout.strip().splitlines()[-1])


def run_llmcompressor(cmd: list[str]) -> str:
    # offline: it loads a local folder, and its hub lookups without network only hang
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def save_calibration(model: str, seed: int, num_samples: int, seq_len: int, path: Path) -> None:
    """The windows `sparsefit prune --calib gsm8k --seed SEED` cuts, written as safetensors."""
    from safetensors.torch import save_file

    from sparsefit.models import load_model_and_tokenizer
    from sparsefit.pruning import OneShotConfig
    from sparsefit.pruning.oneshot import calibration_batch

    m, tok = load_model_and_tokenizer(model, "float32", "cpu")
    config = OneShotConfig(method="wanda", sparsity=0.5, num_samples=num_samples, seq_len=seq_len, seed=seed)
    save_file({"input_ids": calibration_batch(m, tok, config)[0].contiguous()}, str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lc-python", required=True, help="python of a virtual environment with llmcompressor")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/reference_llmcompressor.json")
    args = p.parse_args()
    from sparsefit.models.loading import resolve_model

    resolved = resolve_model(args.model)
    if resolved.source not in ("builtin", "local"):
        sys.exit("--model must be a builtin or a checkpoint directory (both tools load the same folder)")
    source = resolved.path
    version = run_llmcompressor(
        [args.lc_python, "-c", "import llmcompressor; print(llmcompressor.__version__)"]
    ).split()[-1]
    result = {
        "environment": environment(),
        "llmcompressor": version,
        "model": args.model,
        "seed": args.seed,
        "runs": {},
    }
    result["calibration"] = f"gsm8k train {args.num_samples} x {args.seq_len}, sparsefit's windows for seed {args.seed}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = work / "calib.safetensors"
        save_calibration(args.model, args.seed, args.num_samples, args.seq_len, calib)
        for name in args.runs:
            method, structure = RUNS[name]
            lc_out, sf_out, report = work / "lc", work / "sf", work / "report.json"
            lc = worker(args.lc_python, PRUNE, source, calib, lc_out, method, structure)
            lc["ppl"] = evaluate(str(lc_out), work, args.windows)["ppl"]
            sparsefit("prune", "--model", args.model, *PRUNE_FLAGS[name], "--calib", "gsm8k", "--num-samples",
                      str(args.num_samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed),
                      "--device", "cpu", "--output", str(sf_out), "--json", str(report))  # fmt: skip
            ours = json.loads(report.read_text())
            sf = {"seconds": ours["seconds"], "peak_rss_mb": ours["peak_rss_mb"]}
            sf["ppl"] = evaluate(str(sf_out), work, args.windows)["ppl"]
            result["runs"][name] = {"llmcompressor": lc, "sparsefit": sf}
            print(f"{name:14s} llm-compressor ppl {lc['ppl']:.2f} in {lc['seconds']:.0f} s | "
                  f"sparsefit ppl {sf['ppl']:.2f} in {sf['seconds']:.0f} s", flush=True)  # fmt: skip
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
