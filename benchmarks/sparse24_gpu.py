"""2:4 on an NVIDIA GPU: FP8 2:4 (torchao, CUTLASS, sm90) and bf16 2:4 (`to_sparse_semi_structured`)
against bf16 dense and FP8 dense (torchao, per-row), per linear and for a whole prefill.

Per linear: y = x W^T for x of `--tokens` rows, on a Llama-3-8B shape set and on the builtin model's
shapes (`--sets`), each weight pruned 2:4 by magnitude. Each kernel's call is replayed from a CUDA
graph (`--graphs`), so the time is the GPU's alone; the JSON keeps the median time per call of
`--reps` calls back to back, and the ratios FP8 dense / FP8 2:4 and bf16 dense / bf16 2:4 (above 1:
2:4 is faster). The FP8 kernels run through `torch.compile` (`--compile`; `--no-compile-linears`
keeps the per-linear ones eager), as torchao recommends, which fuses the activations' quantization
into one kernel; a bf16 linear is one kernel already.
bf16 2:4 is also timed through each of PyTorch's two backends by name (CUTLASS, cuSPARSELt), and
each FP8 GEMM alone (`-gemm`: the activations quantized beforehand), which is what 2:4 can speed up.

Prefill: one forward over `--batch` x `--prefill` tokens of a 4-block stack with Llama-3-8B's
dimensions and of the builtin model (`--prefill-models`), pruned 2:4, each kernel's decoder linears
converted by `sparsefit.export.semi_structured` (FP8 dense through the same torchao config without
the 2:4 packing). With `--compile` each decoder block is compiled (regional compilation: one compile
serves every block). A kernel that fails to build, compile or capture is recorded in the JSON, and
the others are still measured; the JSON is rewritten after every row, so a run cut short keeps what
it measured. Kernel speed does not depend on the weights' values: on a machine without the builtin
model's file, `--config` takes its architecture from a config.json, with random weights.

Needs a CUDA GPU (FP8 kernels: compute capability 9.0) and torchao (`sparsefit[gpu]`):

    python benchmarks/sparse24_gpu.py --out benchmarks/results/sparse24_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from environment import environment
from sparsefit.atomic import write_json

KERNELS = ("bf16-dense", "fp8-dense", "fp8-2:4", "bf16-2:4")
# Per linear, bf16 2:4 also through each of PyTorch's two backends by name (the default picks one), and
# the two FP8 GEMMs alone, on activations quantized beforehand (`-gemm`).
LINEAR_KERNELS = (*KERNELS, "bf16-2:4-cutlass", "bf16-2:4-cusparselt", "fp8-dense-gemm", "fp8-2:4-gemm")
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}


def shapes(
    hidden_size: int, intermediate_size: int, num_attention_heads: int, num_key_value_heads: int
) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder linear kind of a Llama-style block (arguments named as in its config)."""
    kv = hidden_size // num_attention_heads * num_key_value_heads
    return {
        "q/o": (hidden_size, hidden_size),
        "k/v": (kv, hidden_size),
        "gate/up": (intermediate_size, hidden_size),
        "down": (hidden_size, intermediate_size),
    }


def prune24(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every 4 inputs."""
    from sparsefit.pruning.structure import nm_keep_mask

    return weight * nm_keep_mask(weight.abs().float(), 2, 4).to(weight.dtype)


def failure(err: Exception) -> str:
    """One line for the JSON: the exception's type and the first line of its message."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__


def kernels(weight: torch.Tensor, notes: dict) -> dict[str, nn.Module]:
    """One bf16 linear per kernel, all holding `weight` (2:4 already); a kernel that cannot take the
    weight is left out, with why in `notes`."""
    from torch.sparse import (
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
        to_sparse_semi_structured,
    )
    from torchao.quantization import quantize_

    from sparsefit.export.semi_structured import fp8_config

    def linear() -> nn.Linear:
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=torch.bfloat16)
        m.weight.data.copy_(weight)
        return m.eval().requires_grad_(False)

    def fp8(config) -> nn.Linear:  # noqa: ANN001
        m = linear()
        quantize_(m, config)
        if type(m.weight) in (torch.Tensor, nn.Parameter):  # torchao leaves shapes it cannot take as they were
            raise ValueError("torchao left the weight unquantized (shape unsupported)")
        return m

    def bf16_24(pack=to_sparse_semi_structured) -> nn.Linear:  # noqa: ANN001
        m = linear()
        m.weight = nn.Parameter(pack(weight), requires_grad=False)
        return m

    builders = {
        "bf16-dense": linear,
        "fp8-dense": lambda: fp8(fp8_config(two_four=False)),
        "fp8-2:4": lambda: fp8(fp8_config()),
        "bf16-2:4": bf16_24,
        "bf16-2:4-cutlass": lambda: bf16_24(SparseSemiStructuredTensorCUTLASS.from_dense),
        "bf16-2:4-cusparselt": lambda: bf16_24(SparseSemiStructuredTensorCUSPARSELT.from_dense),
        "fp8-dense-gemm": lambda: fp8(fp8_config(two_four=False)),
        "fp8-2:4-gemm": lambda: fp8(fp8_config()),
    }
    made = {}
    for name, build in builders.items():
        try:
            made[name] = build()
        except Exception as err:  # noqa: BLE001 - recorded, and the other kernels still measured
            notes[name] = f"failed: {failure(err)}"
    return made


def fp8_gemm(module: nn.Linear, x: torch.Tensor):  # noqa: ANN201
    """A call of the FP8 GEMM of torchao's FP8 linear `module` alone, `x` quantized once here (per token,
    as the linear would). Makes `module`'s weight take quantized activations (its activation settings
    move to the module). Reaches into torchao's tensor classes, so the caller records a failure rather
    than stopping."""
    from torchao.quantization.quantize_.common import _choose_quant_func_and_quantize_tensor

    w = module.weight
    if not hasattr(module, "act_quant_kwargs"):
        module.act_quant_kwargs = w.act_quant_kwargs
    xq = _choose_quant_func_and_quantize_tensor(x, module.act_quant_kwargs)
    if hasattr(w, "sparse_metadata"):  # what torchao's FP8 2:4 linear calls once the activations are quantized
        args = (xq.qdata, xq.scale.squeeze(1), w.qdata, w.sparse_metadata, w.scale.squeeze(1), None, x.dtype)
        return lambda: torch.ops.torchao.rowwise_scaled_linear_sparse_cutlass_f8f8(*args)
    w.act_quant_kwargs = None  # torchao's FP8 dense linear then takes `xq` as it is
    return lambda: nn.functional.linear(xq, w)


def compiled(module: nn.Module, example: torch.Tensor, notes: dict, key: str):  # noqa: ANN201
    """`module` through `torch.compile`, or `module` itself (noted under `key`) if compiling fails."""
    fn = torch.compile(module, dynamic=False)
    try:
        with torch.no_grad():
            fn(example)
    except Exception as err:  # noqa: BLE001 - any compiler failure: measure the eager kernel instead
        notes[key] = f"eager: torch.compile failed ({failure(err)})"
        torch._dynamo.reset()
        return module
    return fn


@torch.no_grad()
def median_ms(fn, warmup: int, iters: int, reps: int = 1) -> float:  # noqa: ANN001
    """Median over `iters` samples of the time per call of `reps` calls back to back: with reps > 1
    the GPU queue stays full, so Python's per-call dispatch is hidden where the kernel outlasts it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def graphed(fn, notes: dict, key: str):  # noqa: ANN001, ANN201
    """`fn` captured in a CUDA graph, returning its replay: the GPU's time alone, without Python's
    per-call dispatch (torchao's FP8 tensors spend about as long in Python as a large GEMM on the GPU).
    `fn` itself, noted under `key`, if capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # warm-up outside the graph: autotuning, workspaces, lazy init
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            fn()
    except Exception as err:  # noqa: BLE001 - time the eager calls instead
        notes[key] = f"no CUDA graph ({failure(err)})"
        return fn
    return graph.replay


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def per_linear(args: argparse.Namespace, model_shapes: dict, rows: list, save) -> None:  # noqa: ANN001
    """Append one row per (shape, tokens) to `rows`, calling `save` after each."""
    # The 8B shapes first: they carry the target, and a run cut short keeps what it measured.
    sets = {"llama-3-8b": shapes(**LLAMA3_8B), "builtin": model_shapes}
    for set_name, shape_set in ((name, sets[name]) for name in args.sets):
        for kind, (out_f, in_f) in shape_set.items():
            if args.layers and kind not in args.layers:
                continue
            weight = prune24(torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02)
            built: dict[str, str] = {}
            made = kernels(weight, built)
            for tokens in args.tokens:
                x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
                torch._dynamo.reset()  # nothing compiled for earlier shapes lingers in dynamo's caches
                notes = dict(built)
                # Only FP8 has something to fuse (the activations' quantization); a bf16 linear is one kernel.
                fuse = args.compile and args.compile_linears
                ms = dict.fromkeys(LINEAR_KERNELS)
                for k, m in made.items():
                    try:
                        if k.endswith("-gemm"):
                            call = fp8_gemm(m, x)
                        else:
                            m = compiled(m, x, notes, k) if fuse and "fp8" in k else m
                            call = lambda m=m, x=x: m(x)  # noqa: E731
                        ms[k] = median_ms(
                            graphed(call, notes, k) if args.graphs else call, args.warmup, args.iters, args.reps
                        )
                    except Exception as err:  # noqa: BLE001 - a kernel that cannot take this shape
                        ms[k], notes[k] = None, f"failed: {failure(err)}"
                row = {
                    "set": set_name, "layer": kind, "out": out_f, "in": in_f, "tokens": tokens, "ms": ms,
                    "notes": notes,
                    "fp8_24_speedup_vs_fp8_dense": ratio(ms["fp8-dense"], ms["fp8-2:4"]),
                    "fp8_24_gemm_speedup_vs_fp8_dense_gemm": ratio(ms["fp8-dense-gemm"], ms["fp8-2:4-gemm"]),
                    "bf16_24_speedup_vs_bf16_dense": ratio(ms["bf16-dense"], ms["bf16-2:4"]),
                    "fp8_24_speedup_vs_bf16_dense": ratio(ms["bf16-dense"], ms["fp8-2:4"]),
                }  # fmt: skip
                rows.append(row)
                save()
                print(
                    f"{set_name:10s} {kind:8s} {out_f}x{in_f} @ {tokens}: "
                    + "  ".join(f"{k} {v} ms" for k, v in ms.items())
                    + f"  fp8 dense / fp8 2:4 {row['fp8_24_speedup_vs_fp8_dense']}"
                    + f" (GEMM alone {row['fp8_24_gemm_speedup_vs_fp8_dense_gemm']})",
                    flush=True,
                )


def fp8_dense(model: nn.Module) -> None:
    """FP8 dense (per-row, torchao) on the linears the 2:4 kernels would take, for a like-for-like baseline."""
    from torchao.quantization import quantize_

    from sparsefit.export.semi_structured import fp8_config, two_four_linears

    names = set(two_four_linears(model))
    quantize_(model, fp8_config(two_four=False), filter_fn=lambda m, n: n in names)


def prepared(build, kernel: str) -> tuple[nn.Module, dict | None]:  # noqa: ANN001
    """A fresh model from `build` with its decoder linears on `kernel`, and the 2:4 conversion's report."""
    from sparsefit.export.semi_structured import to_sparse24

    model = build()
    if kernel == "fp8-dense":
        fp8_dense(model)
    elif kernel != "bf16-dense":
        return model, to_sparse24(model, kernel.split("-")[0])
    return model, None


def prefill(args: argparse.Namespace, name: str, build, result: dict, save) -> None:  # noqa: ANN001
    """Forward time of `--batch` x `--prefill` tokens for each kernel on a fresh copy of the model, into
    `result`, calling `save` after each kernel."""
    from sparsefit.models.layout import decoder_layout

    for kernel in KERNELS:
        try:
            model, converted = prepared(build, kernel)
            ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prefill), device="cuda")
            compiled_blocks = "no"
            if args.compile:  # regional: every block has the same code and shapes, so one compile serves all
                for block in decoder_layout(model).blocks:
                    block.compile()
                try:
                    with torch.no_grad():
                        model(input_ids=ids, use_cache=False, logits_to_keep=1)
                    compiled_blocks = "yes"
                except Exception as err:  # noqa: BLE001 - measure the eager model instead
                    compiled_blocks = f"eager: torch.compile failed ({failure(err)})"
                    del model
                    torch._dynamo.reset()
                    model, converted = prepared(build, kernel)
            ms = median_ms(
                lambda m=model, i=ids: m(input_ids=i, use_cache=False, logits_to_keep=1), 3, args.prefill_iters
            )
        except Exception as err:  # noqa: BLE001 - recorded; the other kernels are still measured
            result[kernel] = {"ms": None, "failed": failure(err)}
            print(f"prefill {name} {kernel}: failed: {failure(err)}", flush=True)
        else:
            result[kernel] = {
                "ms": ms,
                "tokens_per_second": args.batch * args.prefill / ms * 1e3,
                "conversion": converted,
                "compiled_blocks": compiled_blocks,
            }
            print(f"prefill {name} {kernel}: {ms:.1f} ms ({compiled_blocks=})", flush=True)
        model = None
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        result[kernel]["speedup_vs_bf16_dense"] = ratio(result["bf16-dense"]["ms"], result[kernel]["ms"])
        result["fp8_24_speedup_vs_fp8_dense"] = ratio(
            result.get("fp8-dense", {}).get("ms"), result.get("fp8-2:4", {}).get("ms")
        )
        save()


def builtin_24(spec: str, config_path: str | None):  # noqa: ANN201
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsefit.models import load_model
    from sparsefit.pruning import OneShotConfig, oneshot

    if config_path:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_path), dtype=torch.bfloat16)
        model.eval()
    else:
        model = load_model(spec, "bfloat16", "cuda")
    oneshot(model, None, OneShotConfig(method="magnitude", structure="2:4"), progress=False)
    return model


def llama3_8b_stack(blocks: int):  # noqa: ANN201
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparsefit.pruning import OneShotConfig, oneshot

    config = LlamaConfig(**LLAMA3_8B, num_hidden_layers=blocks, vocab_size=128256, max_position_embeddings=8192)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    oneshot(model, None, OneShotConfig(method="magnitude", structure="2:4"), progress=False)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--config", help="config.json (or its folder) of --model: its architecture with random weights")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="rows of x per linear")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefill", type=int, default=2048, help="tokens per sequence of the prefill")
    p.add_argument("--blocks", type=int, default=4, help="blocks of the Llama-3-8B-shaped stack")
    p.add_argument("--sets", nargs="+", choices=["llama-3-8b", "builtin"], default=["llama-3-8b", "builtin"])
    p.add_argument("--layers", nargs="+", choices=["q/o", "k/v", "gate/up", "down"], help="per linear: only these")
    p.add_argument("--prefill-models", nargs="*", choices=["llama-3-8b", "builtin"], default=["llama-3-8b", "builtin"])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--reps", type=int, default=10, help="calls back to back per timed sample of one linear")
    p.add_argument(
        "--graphs", action=argparse.BooleanOptionalAction, default=True, help="time each linear as a CUDA graph replay"
    )
    p.add_argument("--prefill-iters", type=int, default=10)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--compile-linears",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --compile, also compile each FP8 linear (one compile per shape and token count)",
    )
    p.add_argument("--out", default="benchmarks/results/sparse24_gpu.json")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of --out that this run does not measure (other shape sets and prefill models)",
    )
    args = p.parse_args()
    import torch._dynamo

    # Every nn.Linear shares one code object, and regional compilation reuses a block's: let dynamo
    # keep a compiled entry per shape and kernel instead of silently falling back to eager at its limit.
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("this benchmark needs an NVIDIA GPU of compute capability 9.0 (Hopper); nothing was measured")
    try:
        import torchao
    except ImportError:
        sys.exit("this benchmark needs torchao: pip install 'sparsefit[gpu]'")

    model_shapes = {}
    if "builtin" in args.sets:
        from sparsefit.models import load_model

        if args.config:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(args.config)
        else:
            config = load_model(args.model, "bfloat16", "cpu").config
        model_shapes = shapes(
            config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads
        )
    result = {
        "benchmark": "sparse24_gpu",
        "environment": {**environment("cuda"), "torchao": torchao.__version__},
        "args": vars(args),
        "weights": f"random, architecture of {args.config}" if args.config else f"{args.model}, pruned 2:4",
        "per_linear": [],
        "prefill": {},
    }
    if args.append and Path(args.out).exists():
        # Keep an earlier run's rows of the shape sets and prefill models this run does not measure.
        earlier = json.loads(Path(args.out).read_text())
        result["per_linear"] = [row for row in earlier["per_linear"] if row["set"] not in args.sets]
        result["prefill"] = {k: v for k, v in earlier["prefill"].items() if k not in prefill_keys(args)}
        kept = [earlier.get("earlier_runs", []), [{k: earlier[k] for k in ("environment", "args", "weights")}]]
        result["earlier_runs"] = [run for runs in kept for run in runs]
    per_linear(args, model_shapes, result["per_linear"], lambda: write_json(args.out, result))
    builds = {
        "llama-3-8b": lambda: llama3_8b_stack(args.blocks),
        "builtin": lambda: builtin_24(args.model, args.config),
    }
    for name, key in zip(args.prefill_models, prefill_keys(args), strict=True):
        result["prefill"][key] = {}
        prefill(args, key, builds[name], result["prefill"][key], lambda: write_json(args.out, result))


def prefill_keys(args: argparse.Namespace) -> list[str]:
    """The JSON's name of each `--prefill-models` entry."""
    names = {"llama-3-8b": f"llama-3-8b-{args.blocks}-blocks", "builtin": args.model}
    return [names[m] for m in args.prefill_models]


if __name__ == "__main__":
    main()
