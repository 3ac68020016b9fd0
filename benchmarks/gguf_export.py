"""GGUF export checked by llama.cpp: `llama-perplexity` of sparsefit's GGUFs vs llama.cpp's own converter.

The builtin model, dense and 50% Wanda-pruned (GSM8K calibration, 32 x 512), saved as a Hugging
Face checkpoint; from that one checkpoint, (a) `sparsefit export --format gguf-f16 | gguf-q8_0 |
gguf-q4_0` and (b) llama.cpp's `convert_hf_to_gguf.py --outtype f16` then `llama-quantize` to Q8_0
and Q4_0. Each file goes through `llama-perplexity` on WikiText-2 test (context 512, the first
`--chunks` chunks), and each file's tensors are read back with gguf-py and compared with the
checkpoint: how many pruned weights read back nonzero. llama.cpp is located (or built) as
benchmarks/llama_cpp.py does; when it cannot be, the result says why instead. Run it alone:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/gguf_export.py --llama-cpp-dir ../llamacpp
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import llama_cpp
from environment import environment
from sparsefit.atomic import write_json

FORMATS = {"gguf-f16": "F16", "gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0"}
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def perplexity_tool(bins: Path) -> Path | str:
    """llama-perplexity beside the other tools, built from the same source tree when missing."""
    tool = bins / "llama-perplexity"
    if tool.exists():
        return tool
    try:
        subprocess.run(["cmake", "--build", str(bins.parent), "--target", "llama-perplexity"], check=True,
                       capture_output=True, text=True)  # fmt: skip
    except (subprocess.CalledProcessError, OSError) as err:
        return f"llama-perplexity build failed: {err}"
    return tool


def converter_env(workdir: Path) -> dict | str:
    """The environment the converter runs in: this interpreter, plus its requirements that sparsefit
    does not need (sentencepiece, which it imports for any Llama) installed under `workdir`."""
    deps = workdir / "convert-deps"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(deps), os.environ.get("PYTHONPATH", "")])}
    probe = [sys.executable, "-c", "import sentencepiece"]
    if subprocess.run(probe, env=env, capture_output=True).returncode:
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps),
                            "sentencepiece>=0.1.98,<0.3.0"], check=True, capture_output=True, text=True)  # fmt: skip
        except subprocess.CalledProcessError as err:
            return f"the converter's requirement sentencepiece did not install: {err.stderr[-300:]}"
    return env


def perplexity(tool: Path, gguf: Path, text: Path, chunks: int, threads: int) -> dict:
    cmd = [str(tool), "-m", str(gguf), "-f", str(text), "-c", "512", "--chunks", str(chunks), "-t", str(threads),
           "-b", "512"]  # fmt: skip
    for _ in range(3):  # llama.cpp's logger thread may lose its last lines at exit (llama.cpp issue 22142)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        match = _PPL.search(proc.stdout + proc.stderr)
        if proc.returncode or match:
            break
    if proc.returncode or not match:
        return {"error": f"llama-perplexity exit {proc.returncode}: {(proc.stderr or proc.stdout)[-400:]}"}
    return {"ppl": float(match.group(1)), "ppl_err": float(match.group(2)), "seconds": seconds}


def revived(gguf: Path, checkpoint: dict[str, torch.Tensor], config) -> dict:  # noqa: ANN001
    """Pruned (0) decoder weights of the checkpoint that read back nonzero from `gguf`, and how many
    weights were compared."""
    import gguf as gguf_py

    from sparsefit.export.gguf import decode, permute_qk

    names = gguf_py.get_tensor_name_map(gguf_py.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    kv = config.num_key_value_heads
    stored = {t.name: t for t in gguf_py.GGUFReader(gguf).tensors}
    count = zeros = 0
    for key, w in checkpoint.items():
        if ".layers." not in key or w.dim() != 2:
            continue
        t = stored[names.get_name(key, try_suffixes=(".weight",))]
        if "q_proj" in key:
            w = permute_qk(w, config.num_attention_heads)
        elif "k_proj" in key:
            w = permute_qk(w, kv)
        back = decode(t.data, t.tensor_type, tuple(w.shape))
        zeros += int((w == 0).sum())
        count += int((back[w == 0] != 0).sum())
    return {"pruned_weights": zeros, "revived": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--llama-cpp-dir", default=str(Path(__file__).resolve().parents[2] / "llamacpp"))
    parser.add_argument("--chunks", type=int, default=16, help="512-token chunks of WikiText-2 per perplexity run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", default="benchmarks/results/gguf.json")
    args = parser.parse_args()

    from sparsefit.data.sources import data_dir
    from sparsefit.export import export_checkpoint, save_checkpoint
    from sparsefit.models import load_model_and_tokenizer
    from sparsefit.pruning import OneShotConfig, oneshot

    root = data_dir()
    if root is None or not (root / "wikitext-2-raw" / "wiki.test.raw").is_file():
        sys.exit("set SPARSEFIT_DATA_DIR to the shared data (wikitext-2-raw/wiki.test.raw)")
    text = root / "wikitext-2-raw" / "wiki.test.raw"
    result = {"environment": environment(), "args": vars(args), "models": {}}
    bins = llama_cpp.build(Path(args.llama_cpp_dir))
    tool = perplexity_tool(bins) if isinstance(bins, Path) else bins
    if isinstance(tool, str):
        result["llama_cpp"] = f"not run: {tool}"
        write_json(Path(args.out), result)
        print(result["llama_cpp"])
        return
    converter = bins.parents[1] / "convert_hf_to_gguf.py"
    env = converter_env(Path(args.llama_cpp_dir))
    with tempfile.TemporaryDirectory() as tmp:
        for label, sparsity in (("dense", 0.0), (f"wanda-{int(args.sparsity * 100)}", args.sparsity)):
            model, tok = load_model_and_tokenizer(args.model, "float32", "cpu")
            record = {}
            if sparsity:
                config = OneShotConfig(method="wanda", sparsity=sparsity, calib="gsm8k", num_samples=32, self_mix=0)
                record["pruning"] = oneshot(model, tok, config, progress=False)
            checkpoint = Path(tmp) / label / "hf"
            save_checkpoint(model, tok, checkpoint, record)
            weights = {k: v.clone() for k, v in model.state_dict().items()}
            rows = {}
            # llama.cpp's own: convert to f16, then quantize that file
            theirs = {"F16": Path(tmp) / label / "llama-F16.gguf"}
            start = time.perf_counter()
            proc = None
            if isinstance(env, dict):
                cmd = [sys.executable, str(converter), str(checkpoint), "--outtype", "f16", "--outfile",
                       str(theirs["F16"])]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc is None or proc.returncode:
                rows["llama.cpp"] = env if proc is None else f"convert_hf_to_gguf.py failed: {proc.stderr[-400:]}"
                theirs = {}
            convert_seconds = time.perf_counter() - start
            for t in ("Q8_0", "Q4_0"):
                if theirs:
                    theirs[t] = Path(tmp) / label / f"llama-{t}.gguf"
                    subprocess.run([str(bins / "llama-quantize"), str(theirs["F16"]), str(theirs[t]), t], check=True,
                                   capture_output=True)  # fmt: skip
            for fmt, t in FORMATS.items():
                start = time.perf_counter()
                info = export_checkpoint(model, tok, Path(tmp) / label / fmt, str(checkpoint), fmt)
                ours = Path(tmp) / label / fmt / info["gguf"]["file"]
                row = {"export_seconds": time.perf_counter() - start, "bytes": ours.stat().st_size}
                row["sparsefit"] = {**perplexity(tool, ours, text, args.chunks, args.threads),
                                    **revived(ours, weights, model.config)}  # fmt: skip
                if t in theirs:
                    row["llama_cpp"] = {**perplexity(tool, theirs[t], text, args.chunks, args.threads),
                                        **revived(theirs[t], weights, model.config),
                                        "bytes": theirs[t].stat().st_size}  # fmt: skip
                    a, b = row["sparsefit"].get("ppl"), row["llama_cpp"].get("ppl")
                    if a and b:
                        row["ppl_ratio"] = a / b
                rows[t] = row
                print(label, t, {k: v for k, v in row.items() if k != "bytes"}, flush=True)
            result["models"][label] = {
                "sparsity": info["sparsity"],
                "convert_seconds": convert_seconds,
                "formats": rows,
            }
            write_json(Path(args.out), result)
    ratios = [r["ppl_ratio"] for m in result["models"].values() for r in m["formats"].values() if "ppl_ratio" in r]
    result["max_ppl_deviation"] = max(abs(x - 1) for x in ratios) if ratios else None
    write_json(Path(args.out), result)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
