"""Sparse CPU runtime speed: packed kernels per linear, end-to-end decode, 7B-shaped layers.

(a) linears: y = x W^T for Llama-2-7B's shapes and the builtin model's, batch 1/4/16, sparsity
    0/50/70/90% (random unstructured masks), bf16 and int8 values, against torch's dense fp32 and
    bf16 `F.linear` on the same call. Every call uses a different copy of the weight out of a
    rotation larger than the last-level cache, so all of them stream from DRAM; DRAM read
    bandwidth is measured in the same run (a sum over 1 GiB) and each time is set against its
    floor (bytes moved / bandwidth). Also the density where the bitmask layout stops paying
    against the packed dense layout (the `DENSE_ABOVE` crossover).
(b) end to end: the builtin model dense and magnitude-pruned to 50% / 70% (same speed as any other
    unstructured mask), bf16 and 70% + int8, prefill and decode tokens/s at batch 1 and 8, against
    plain transformers `generate` of the dense model (fp32 and bf16, batch 1) and llama.cpp's
    `llama-bench` on F16 / Q8_0 / Q4_0 GGUFs of the same weights.
(isas) every kernel row this CPU runs (`--isa`) on the 7B shapes, batch 1 and 8, 50% / 70%, both
    value types, each against torch's best in the same run: what `auto` chose over.
(c) a stack of Llama-2-7B-shaped decoder layers (random weights, small vocabulary): decode latency
    per layer, dense (torch fp32, the packed dense layout) against sparse.

Run it alone on the machine (nothing else on the cores):

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/runtime.py [--parts linears e2e layers]
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llama_cpp
from environment import ROOT, environment
from sparsefit.atomic import write_json
from sparsefit.runtime.kernels import ISAS, choose_isa, load_kernels
from sparsefit.runtime.packing import pack

SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): q/k/v/o, gate/up, down
SHAPES_BUILTIN = [(576, 576), (1536, 576), (576, 1536)]
ROTATION_BYTES = 640 * 2**20  # > the largest L3 seen on our machines (~300-520 MB)
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vbmi", "avx512_vbmi2",
             "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")  # fmt: skip


def cpu_flags() -> list[str]:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return [f for f in CPU_FLAGS if f in flags]


def dram_read_gbps() -> float:
    x = torch.ones(2**28)  # 1 GiB of float32
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _per_call(calls: list, min_seconds: float = 0.25) -> float:
    """Median seconds per call over full passes of the rotation (each call its own weight copy)."""
    for c in calls[: min(len(calls), 4)]:
        c()
    passes, times = 0, []
    start = time.perf_counter()
    while passes < 3 or (time.perf_counter() - start < min_seconds and passes < 200):
        t0 = time.perf_counter()
        for c in calls:
            c()
        times.append((time.perf_counter() - t0) / len(calls))
        passes += 1
    return statistics.median(times)


def _copies(nbytes: int) -> int:
    return max(2, math.ceil(ROTATION_BYTES / max(nbytes, 1)))


def _packed_calls(p, batch: int, isa: str, copies: int) -> tuple[list, int]:
    op = torch.ops.sparsefit.linear
    x = torch.randn(batch, p.cols)
    calls = []
    for _ in range(copies):
        masks, values, offsets = p.masks.clone(), p.values.clone(), p.block_offsets.clone()
        scales = p.scales.clone() if p.scales is not None else None

        def call(masks=masks, values=values, offsets=offsets, scales=scales):
            return op(x, masks, values, offsets, scales, None, p.rows, p.cols, p.row_block, isa)

        calls.append(call)
    return calls, p.nbytes


def _torch_calls(w: torch.Tensor, batch: int, dtype: torch.dtype, copies: int) -> list:
    x = torch.randn(batch, w.shape[1], dtype=dtype)
    ws = [w.to(dtype).clone() for _ in range(copies)]
    return [lambda w=w: F.linear(x, w) for w in ws]


def linears(isa: str, bandwidth: float, shapes: list[tuple[int, int]], batches: list[int],
            sparsities: list[float]) -> list[dict]:  # fmt: skip
    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f) * 0.02
        dense = {}
        for batch in batches:
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                nbytes = w.numel() * (4 if dtype == torch.float32 else 2)
                dense[batch, name] = _per_call(_torch_calls(w, batch, dtype, _copies(nbytes)))
        for sparsity in sparsities:
            ws = w * (torch.rand_like(w) >= sparsity)
            for values in ("bfloat16", "int8"):
                p = pack(ws, values, dense=sparsity == 0)
                for batch in batches:
                    calls, nbytes = _packed_calls(p, batch, isa, _copies(p.nbytes))
                    t = _per_call(calls)
                    del calls
                    fp32, bf16 = dense[batch, "float32"], dense[batch, "bfloat16"]
                    best = min(fp32, bf16)
                    floor = nbytes / (bandwidth * 1e9)
                    rows.append({
                        "shape": [out_f, in_f], "batch": batch, "sparsity": sparsity, "values": values,
                        "layout": "dense" if sparsity == 0 else "bitmask", "seconds": t,
                        "weight_bytes": nbytes, "bytes_vs_dense_bf16": nbytes / (w.numel() * 2),
                        "gbps": nbytes / t / 1e9, "floor_fraction": floor / t,
                        "torch_fp32_seconds": fp32, "torch_bf16_seconds": bf16,
                        "vs_torch_fp32": fp32 / t, "vs_torch_bf16": bf16 / t, "vs_torch_best": best / t,
                    })  # fmt: skip
                    print(f"  {out_f}x{in_f} b{batch} s{sparsity:.0%} {values}: {t * 1e6:8.1f} us "
                          f"{rows[-1]['gbps']:5.1f} GB/s  x{best / t:.2f} vs torch best", flush=True)  # fmt: skip
    return rows


def crossover(isa: str) -> list[dict]:
    """Bitmask layout against the packed dense layout near full density (4096 x 11008, batch 1)."""
    w = torch.randn(4096, 11008) * 0.02
    rows = []
    for values in ("bfloat16", "int8"):
        d = pack(w, values, dense=True)
        t_dense = _per_call(_packed_calls(d, 1, isa, _copies(d.nbytes))[0])
        for density in (0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7):
            p = pack(w * (torch.rand_like(w) < density), values, dense=False)
            t = _per_call(_packed_calls(p, 1, isa, _copies(p.nbytes))[0])
            rows.append({"values": values, "density": density, "bitmask_seconds": t, "dense_seconds": t_dense,
                         "bitmask_vs_dense": t_dense / t})  # fmt: skip
            print(f"  crossover {values} density {density}: bitmask x{t_dense / t:.2f}", flush=True)
    return rows


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summarize_linears(rows: list[dict]) -> dict:
    out = {}
    for sparsity, values, batch in ((0.5, "bfloat16", 1), (0.7, "bfloat16", 1), (0.7, "int8", 1),
                                    (0.9, "bfloat16", 1), (0.5, "bfloat16", 4), (0.5, "bfloat16", 8),
                                    (0.7, "int8", 8), (0.5, "bfloat16", 16), (0.0, "bfloat16", 1),
                                    (0.0, "int8", 1)):  # fmt: skip
        sel = [r for r in rows if r["sparsity"] == sparsity and r["values"] == values and r["batch"] == batch
               and tuple(r["shape"]) in SHAPES_7B]  # fmt: skip
        if sel:
            out[f"7b_s{int(sparsity * 100)}_{values}_b{batch}"] = {
                "vs_torch_best": _geomean([r["vs_torch_best"] for r in sel]),
                "vs_torch_fp32": _geomean([r["vs_torch_fp32"] for r in sel]),
                "floor_fraction": _geomean([r["floor_fraction"] for r in sel]),
                "bytes_vs_dense_bf16": _geomean([r["bytes_vs_dense_bf16"] for r in sel]),
            }
    return out


# --- (b) end to end ------------------------------------------------------------------------------

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List five uses for a paperclip.",
    "What is the capital of France, and why is it famous?",
    "Describe the water cycle to a child.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
]


def _prune(model: str, sparsity: float, out: Path) -> None:
    cmd = [sys.executable, "-m", "sparsefit", "prune", "--model", model, "--method", "magnitude",
           "--sparsity", str(sparsity), "--output", str(out), "--overwrite"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _runtime_run(spec: str, values: str, batch: int, new_tokens: int) -> dict:
    from sparsefit.runtime.model import generate, load_runtime

    model = load_runtime(spec, "sparse", values, progress=False)
    generate(model, PROMPTS[:batch], 8, ignore_eos=True)  # warm-up
    r = generate(model, PROMPTS[:batch], new_tokens, ignore_eos=True)
    return {"weight_bytes": model.weight_bytes, "kernel": model.kernel, **r.stats}


def _hf_run(spec: str, dtype: str, new_tokens: int) -> dict:
    from sparsefit.models import load_model_and_tokenizer
    from sparsefit.runtime.hf import hf_generate
    from sparsefit.runtime.model import encode_prompt
    from sparsefit.runtime.sampling import Sampling

    model, tok = load_model_and_tokenizer(spec, dtype, "cpu")
    hf_generate(model, tok, encode_prompt(tok, PROMPTS[0]), 8, Sampling(), (), True)
    r = hf_generate(model, tok, encode_prompt(tok, PROMPTS[0]), new_tokens, Sampling(), (), True)
    return {"decode_tokens_per_s": r["decode_tokens"] / r["decode_seconds"],
            "prefill_seconds": r["prefill_seconds"]}  # fmt: skip


def end_to_end(model: str, new_tokens: int, llama_dir: Path | None, threads: int) -> dict:
    result: dict = {"new_tokens": new_tokens, "prompts": len(PROMPTS), "pruning": "magnitude, unstructured"}
    with tempfile.TemporaryDirectory() as tmp:
        specs = {"dense": model}
        for s in (0.5, 0.7):
            _prune(model, s, Path(tmp) / f"s{int(s * 100)}")
            specs[f"{int(s * 100)}%"] = str(Path(tmp) / f"s{int(s * 100)}")
        runs = {}
        for name, spec, values in (("dense bf16", specs["dense"], "bfloat16"), ("dense int8", specs["dense"], "int8"),
                                   ("50% bf16", specs["50%"], "bfloat16"), ("70% bf16", specs["70%"], "bfloat16"),
                                   ("70% int8", specs["70%"], "int8")):  # fmt: skip
            for batch in (1, 8):
                r = _runtime_run(spec, values, batch, new_tokens)
                runs[f"{name} b{batch}"] = r
                print(f"  {name} batch {batch}: decode {r['decode_tokens_per_s']:.1f} tok/s, "
                      f"prefill {r['prefill_tokens_per_s']:.0f} tok/s", flush=True)  # fmt: skip
        result["sparsefit"] = runs
    hf = {}
    for dtype in ("float32", "bfloat16"):
        hf[dtype] = _hf_run(model, dtype, new_tokens)
        print(f"  transformers generate {dtype}: {hf[dtype]['decode_tokens_per_s']:.1f} tok/s", flush=True)
    result["transformers"] = hf
    hf_best = max(r["decode_tokens_per_s"] for r in hf.values())
    if llama_dir is None:
        result["llama_cpp"] = "not run: --no-llama-cpp"
    else:
        bins = llama_cpp.build(llama_dir)
        if isinstance(bins, str):
            result["llama_cpp"] = f"not run: {bins}"
        else:
            lc = {}
            for t, path in llama_cpp.builtin_ggufs(bins, llama_dir).items():
                lc[t] = llama_cpp.bench(bins, path, threads, generate=new_tokens)
                print(f"  llama.cpp {t}: decode {lc[t]['decode_tokens_per_s']:.1f} tok/s", flush=True)
            result["llama_cpp"] = lc
    ratios = {}
    for name, r in result["sparsefit"].items():
        if name.endswith("b1"):
            ratios[name] = {"vs_transformers_best": r["decode_tokens_per_s"] / hf_best}
            if isinstance(result["llama_cpp"], dict):
                for t, v in result["llama_cpp"].items():
                    ratios[name][f"vs_llama_cpp_{t}"] = r["decode_tokens_per_s"] / v["decode_tokens_per_s"]
    result["decode_ratios_batch1"] = ratios
    return result


# --- (c) 7B-shaped layers ------------------------------------------------------------------------


def layers_7b(num_layers: int, steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsefit.runtime.checkpoint import ModelTensors
    from sparsefit.runtime.decoder import load_decoder
    from sparsefit.runtime.reference import ReferenceDecoder

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=num_layers, vocab_size=1024, max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    out: dict = {"layers": num_layers, "context_tokens": 64, "steps": steps}
    matrices = [p for p in model.model.layers.parameters() if p.dim() == 2]
    originals = [p.detach().clone() for p in matrices]
    for sparsity in (0.0, 0.5, 0.7):
        with torch.no_grad():
            for p, original in zip(matrices, originals):
                p.copy_(original * (torch.rand_like(p) >= sparsity))
        src = ModelTensors(model)
        variants = [
            ("sparse bf16", lambda src=src: load_decoder(src, "bfloat16")),
            ("sparse int8", lambda src=src: load_decoder(src, "int8")),
        ]
        if sparsity == 0:
            variants.insert(0, ("torch fp32", lambda src=src: ReferenceDecoder(src)))
        for name, build in variants:
            dec = build()
            cache = dec.new_cache(1, 64 + steps + 1)
            tokens = torch.randint(0, 1024, (64,))
            rows = torch.zeros(64, dtype=torch.long)
            dec.forward(tokens, rows, torch.arange(64), cache, torch.tensor([63]))
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                dec.forward(tokens[:1], rows[:1], torch.tensor([64 + i]), cache, torch.tensor([0]))
                times.append(time.perf_counter() - t0)
            key = f"{int(sparsity * 100)}% {name}"
            out[key] = {"ms_per_layer": statistics.median(times) * 1e3 / num_layers}
            print(f"  7B layers {key}: {out[key]['ms_per_layer']:.2f} ms/layer", flush=True)
            del dec, cache
    base = out["0% torch fp32"]["ms_per_layer"]
    for v in out.values():
        if isinstance(v, dict):
            v["vs_torch_fp32"] = base / v["ms_per_layer"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["linears", "isas", "e2e", "layers"],
        choices=["linears", "isas", "e2e", "layers"],
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="default: every core")
    parser.add_argument("--isa", default=None, help="kernel path (default: the best this CPU runs)")
    parser.add_argument("--llama-cpp-dir", default=str(ROOT.parent / "llamacpp"),
                        help="where llama.cpp is (or gets) built")  # fmt: skip
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a few small shapes only (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/runtime.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = load_kernels()
    if not kernels.available:
        raise SystemExit(f"sparse kernels unavailable: {kernels.reason}")
    isa = choose_isa(args.isa)
    result = {"environment": environment(), "cpu_flags": cpu_flags(), "kernel_isa": isa,
              "threads": torch.get_num_threads()}  # fmt: skip
    result["dram_read_gbps"] = dram_read_gbps()
    print(f"DRAM read {result['dram_read_gbps']:.1f} GB/s, kernel {isa}, {torch.get_num_threads()} threads", flush=True)
    if "linears" in args.parts:
        shapes = SHAPES_BUILTIN[:1] if args.quick else SHAPES_7B + SHAPES_BUILTIN
        rows = linears(isa, result["dram_read_gbps"], shapes, [1] if args.quick else [1, 4, 8, 16],
                       [0.0, 0.7] if args.quick else [0.0, 0.5, 0.7, 0.9])  # fmt: skip
        result["linears"] = rows
        result["linears_summary"] = summarize_linears(rows)
        if not args.quick:
            result["crossover"] = crossover(isa)
        write_json(Path(args.out), result)  # each part kept as it ends
    if "isas" in args.parts:
        result["isas"] = {}
        for name in (n for n in ISAS if kernels.supports(n)):
            print(f"kernel row {name}:", flush=True)
            rows = linears(name, result["dram_read_gbps"], SHAPES_7B, [1, 8], [0.5, 0.7])
            result["isas"][name] = summarize_linears(rows)
            write_json(Path(args.out), result)
    if "e2e" in args.parts:
        llama_dir = None if args.no_llama_cpp else Path(args.llama_cpp_dir)
        result["end_to_end"] = end_to_end(args.model, 16 if args.quick else args.new_tokens, llama_dir,
                                          torch.get_num_threads())  # fmt: skip
        write_json(Path(args.out), result)
    if "layers" in args.parts:
        result["layers_7b"] = layers_7b(1 if args.quick else 2, 5 if args.quick else 20)
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
