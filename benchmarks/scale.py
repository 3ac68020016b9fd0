"""Scale by simulation: one-shot SparseGPT on 8B-class block shapes, on this machine.

A Llama-3-8B-shaped model and a Mixtral-8x7B-shaped one (hidden 4096, intermediate 14336, 32 heads,
8 key/value heads, vocabulary 128256; Mixtral: 8 experts, 2 per token) are cut to a few decoder
layers and given random bf16 weights (normal, std 0.02; norms 1), written to disk as safetensors
shards built on the meta device and filled one tensor at a time, so the whole model is never in
memory. Each is then pruned by the real command line, `sparsefit prune --method sparsegpt
--sparsity 0.5 --dtype bfloat16 --offload-dir DIR` (the default best preset: sequential order,
4-step refit), as a child process whose resident memory is sampled from /proc every 0.2 s
(total, anonymous, file-backed) and whose ru_maxrss is read when it ends. Calibration is small:
GSM8K train, `--num-samples` x `--seq-len` tokens (16 x 512 by default), tokenized with
SmolLM2's tokenizer (its 49152 ids lie inside the vocabulary; the weights are random anyway).

The memory bound each run is held to is one block's weights in float32 + its Hessians (float32
d_in x d_in per input group: q/k/v, o, gate/up, down; per expert for Mixtral) + the calibration
activations (tokens x hidden in float32) + 1 GiB. Full depth (32 layers) is extrapolated as

    time(32) = fixed + 32 * per_block       (fixed = the run's time outside its blocks: loading,
                                             calibration, capture, save; per_block = the mean block)
    peak RSS(32) = peak RSS(measured)       (with offloading each finished block goes to disk, so
                                             the peak is one block's, not the model's)

The second holds only if resident memory does not grow from block to block: the JSON keeps a
timeline of it (every 5 s) and each block's time, for that check. Run it alone on the machine:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/scale.py --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from environment import environment
from sparsefit.atomic import write_json

FULL_DEPTH = 32
GIB = 2**30
SHAPES = {
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,  # Mixtral's own is 32000: only the embeddings differ, outside every block
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_theta=1e6,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
}


def config_for(name: str, layers: int):  # noqa: ANN201
    fields = dict(SHAPES[name])
    return AutoConfig.for_model(fields.pop("model_type"), num_hidden_layers=layers, **fields)


def write_random_checkpoint(config, out: Path, shard_bytes: int = GIB) -> dict:  # noqa: ANN001
    """Random bf16 weights for `config`'s model, shard by shard: the model itself lives on the meta
    device, and at most one shard's tensors exist at once. Returns sizes and the writer's peak RSS."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    del model
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, files, total = {}, {}, 0, [], 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            file = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            files.append(file)
            weight_map.update(dict.fromkeys(shard, file))
            shard, size = {}, 0

    for name, shape in shapes.items():
        if len(shape) == 1:  # norms
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
        del t
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    return {"checkpoint_bytes": total, "shards": len(files)}


def block_sizes(config) -> dict:  # noqa: ANN001
    """Bytes of one decoder block's weights in float32, of its Hessians, per the table's input groups."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    attention = 2 * h * h + 2 * h * kv  # q, o; k, v
    experts = getattr(config, "num_local_experts", None)
    if experts:
        mlp = experts * 3 * h * i + experts * h  # experts' gate, up, down; the router
        hessians = 2 * h * h + experts * (h * h + i * i)  # q/k/v, o; per expert gate/up, down
    else:
        mlp = 3 * h * i
        hessians = 3 * h * h + i * i  # q/k/v, o, gate/up, down
    return {"weights_fp32": 4 * (attention + mlp + 2 * h), "hessians_fp32": 4 * hessians}


class Sampler(threading.Thread):
    """Samples a process's resident memory (/proc/PID/status) until it ends; peaks in bytes."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.timeline: list[tuple[float, int, int]] = []  # (seconds, anon MiB, file MiB), thinned
        self._start = time.perf_counter()

    def run(self) -> None:
        while True:
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            now = {}
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    now[key] = int(value.split()[0]) * 1024
            if not now:  # a zombie has no memory lines
                return
            for key, value in now.items():
                self.peak[key] = max(self.peak[key], value)
            t = time.perf_counter() - self._start
            if not self.timeline or t - self.timeline[-1][0] >= 5:
                self.timeline.append((round(t, 1), now.get("RssAnon", 0) >> 20, now.get("RssFile", 0) >> 20))
            time.sleep(self.every)


def prune(model_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    report = work / "report.json"
    cmd = [
        sys.executable, "-m", "sparsefit.cli", "prune", "--model", str(model_dir), "--dtype", "bfloat16",
        "--method", "sparsegpt", "--sparsity", "0.5", "--calib", "gsm8k", "--num-samples", str(args.num_samples),
        "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
        "--offload-dir", str(work / "offload"), "--output", str(work / "pruned"), "--overwrite",
        "--json", str(report),
    ]  # fmt: skip
    load_before = os.getloadavg()  # the machine is shared: its load says how far the times are inflated
    start = time.perf_counter()
    with open(work / "stdout.txt", "w") as out_f, open(work / "stderr.txt", "w") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so its own rusage comes back
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    sampler.join()
    out, err = (work / "stdout.txt").read_text(), (work / "stderr.txt").read_text()
    result = {
        "command": " ".join(cmd[1:]),
        "exit_code": code,
        "seconds": round(seconds, 1),
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "sampled_peak_rss_mib": sampler.peak["VmRSS"] >> 20,
        "sampled_peak_anon_mib": sampler.peak["RssAnon"] >> 20,
        "sampled_peak_file_mib": sampler.peak["RssFile"] >> 20,
        "ru_maxrss_mib": usage.ru_maxrss >> 10,
        "rss_timeline_s_anon_file_mib": sampler.timeline,
    }
    if code:
        result["stderr_tail"] = err[-3000:]
        return result
    r = json.loads(report.read_text())
    result |= {
        "stdout": out.strip().splitlines()[-2:],
        "pruning_peak_rss_mib": round(r["peak_rss_mb"]),
        "process_peak_rss_mib": round(r["process_peak_rss_mb"]),
        "pruning_seconds": round(r["seconds"], 1),
        "phases": {k: round(v, 1) for k, v in r["phases"].items()},
        "block_seconds": [round(s, 1) for s in r["block_seconds"]],
        "sparsity_overall": r["sparsity"]["overall"],
        "sparsity_per_kind": r["sparsity"]["per_kind"],
        "compute_dtype": r["compute_dtype"],
        "calibration": r["calibration"],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--work", default=None, help="scratch folder on a disk (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    args = parser.parse_args()
    work_root = Path(args.work or tempfile.mkdtemp(prefix="sparsefit-scale-"))
    results = {}
    try:
        for name in args.models:
            config = config_for(name, args.layers)
            work = work_root / name
            shutil.rmtree(work, ignore_errors=True)
            t = time.perf_counter()
            written = write_random_checkpoint(config, work / "model")
            from sparsefit.models.loading import load_tokenizer

            load_tokenizer("smollm2-135m").save_pretrained(work / "model")
            written["seconds"] = round(time.perf_counter() - t, 1)
            run = prune(work / "model", work, args)
            sizes = block_sizes(config)
            tokens = args.num_samples * args.seq_len
            activations = 4 * tokens * config.hidden_size
            bound = sizes["weights_fp32"] + sizes["hessians_fp32"] + activations + GIB
            entry = {
                "shape": SHAPES[name],
                "layers": args.layers,
                "checkpoint": written,
                "run": run,
                "bound": {
                    "block_weights_fp32_mib": sizes["weights_fp32"] >> 20,
                    "block_hessians_fp32_mib": sizes["hessians_fp32"] >> 20,
                    "calibration_activations_fp32_mib": activations >> 20,
                    "slack_mib": 1024,
                    "total_mib": bound >> 20,
                },
            }
            if run["exit_code"] == 0:
                peak = run["ru_maxrss_mib"]
                blocks = run["block_seconds"]
                per_block = sum(blocks) / len(blocks)
                fixed = run["seconds"] - sum(blocks)
                entry["bound"] |= {
                    "peak_rss_mib": peak,
                    "met": peak <= bound >> 20,
                    "anon_peak_mib": run["sampled_peak_anon_mib"],
                    "anon_met": run["sampled_peak_anon_mib"] <= bound >> 20,
                }
                entry["full_depth"] = {
                    "layers": FULL_DEPTH,
                    "formula": "seconds = fixed + layers * per_block; peak RSS = measured peak (one block's)",
                    "fixed_seconds": round(fixed, 1),
                    "per_block_seconds": round(per_block, 1),
                    "seconds": round(fixed + FULL_DEPTH * per_block),
                    "hours": round((fixed + FULL_DEPTH * per_block) / 3600, 2),
                    "peak_rss_mib": peak,
                    "checkpoint_bytes_bf16": written["checkpoint_bytes"]
                    + (FULL_DEPTH - args.layers) * sizes["weights_fp32"] // 2,
                }
            results[name] = entry
            print(json.dumps({name: entry}, indent=1), flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work_root, ignore_errors=True)
    write_json(
        args.out,
        {
            "what": "one-shot SparseGPT 50% with offloading on 8B-class shapes cut to a few layers",
            "calibration": {"dataset": "gsm8k", "samples": args.num_samples, "seq_len": args.seq_len},
            "models": results,
            "environment": environment(),
        },
    )


if __name__ == "__main__":
    main()
