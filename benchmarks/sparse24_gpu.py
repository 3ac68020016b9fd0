"""2:4 on an NVIDIA GPU: FP8 2:4 (torchao, CUTLASS, sm90) and bf16 2:4 (`to_sparse_semi_structured`)
against bf16 dense and FP8 dense (torchao, per-row), per linear and for a whole prefill.

Per linear: y = x W^T for x of `--tokens` rows, on the builtin model's shapes and on a Llama-3-8B
shape set, each weight pruned 2:4 by magnitude; the median time of each kernel (CUDA events, after
warm-up), with the ratios FP8 dense / FP8 2:4 and bf16 dense / bf16 2:4 (above 1: 2:4 is faster).
Prefill: one forward over `--batch` x `--prefill` tokens of the builtin model pruned 2:4 and of a
4-block stack with Llama-3-8B's dimensions (random weights, pruned 2:4), each kernel's decoder
linears converted by `sparsefit.export.semi_structured` (FP8 dense through the same torchao config
without the 2:4 packing). `--compile` runs each module through `torch.compile` first, as torchao
recommends for its dynamic activation quantization.

Needs a CUDA GPU (FP8 kernels: compute capability 9.0) and torchao (`sparsefit[gpu]`):

    python benchmarks/sparse24_gpu.py --out benchmarks/results/sparse24_gpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch import nn

from environment import environment
from sparsefit.atomic import write_json

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}


def shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder linear kind of a Llama-style block."""
    kv = hidden // heads * kv_heads
    return {
        "q/o": (hidden, hidden),
        "k/v": (kv, hidden),
        "gate/up": (intermediate, hidden),
        "down": (hidden, intermediate),
    }


def prune24(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every 4 inputs."""
    from sparsefit.pruning.structure import nm_keep_mask

    return weight * nm_keep_mask(weight.abs().float(), 2, 4).to(weight.dtype)


def kernels(weight: torch.Tensor, compile_: bool) -> dict[str, nn.Module]:
    """One bf16 linear per kernel, all holding `weight` (2:4 already)."""
    from torch.sparse import to_sparse_semi_structured
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from sparsefit.export.semi_structured import fp8_sparse_config

    def linear() -> nn.Linear:
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=torch.bfloat16)
        m.weight.data.copy_(weight)
        return m.eval().requires_grad_(False)

    made = {"bf16-dense": linear(), "fp8-dense": linear(), "fp8-2:4": linear(), "bf16-2:4": linear()}
    quantize_(made["fp8-dense"], Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    quantize_(made["fp8-2:4"], fp8_sparse_config())
    made["bf16-2:4"].weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
    return {k: torch.compile(m) if compile_ else m for k, m in made.items()}


@torch.no_grad()
def median_ms(fn, warmup: int, iters: int) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def per_linear(args: argparse.Namespace, model_shapes: dict) -> list[dict]:
    rows = []
    for set_name, shape_set in (("builtin", model_shapes), ("llama-3-8b", shapes(**LLAMA3_8B))):
        for kind, (out_f, in_f) in shape_set.items():
            weight = prune24(torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02)
            made = kernels(weight, args.compile)
            for tokens in args.tokens:
                x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
                ms = {k: median_ms(lambda m=m, x=x: m(x), args.warmup, args.iters) for k, m in made.items()}
                row = {
                    "set": set_name, "layer": kind, "out": out_f, "in": in_f, "tokens": tokens, "ms": ms,
                    "fp8_24_speedup_vs_fp8_dense": ms["fp8-dense"] / ms["fp8-2:4"],
                    "bf16_24_speedup_vs_bf16_dense": ms["bf16-dense"] / ms["bf16-2:4"],
                    "fp8_24_speedup_vs_bf16_dense": ms["bf16-dense"] / ms["fp8-2:4"],
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{set_name:10s} {kind:8s} {out_f}x{in_f} @ {tokens}: "
                    + "  ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
                    + f"  fp8 2:4 / fp8 dense {row['fp8_24_speedup_vs_fp8_dense']:.2f}x",
                    flush=True,
                )
    return rows


def prefill(args: argparse.Namespace, name: str, build) -> dict:  # noqa: ANN001
    """Forward time of `--batch` x `--prefill` tokens for each kernel on a fresh copy of the model."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from sparsefit.export.semi_structured import to_sparse24, two_four_linears

    result = {}
    for kernel in ("bf16-dense", "fp8-dense", "fp8-2:4", "bf16-2:4"):
        model = build()
        converted = None
        if kernel == "fp8-dense":
            names = set(two_four_linears(model))
            quantize_(
                model,
                Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                filter_fn=lambda m, n, names=names: n in names,
            )
        elif kernel != "bf16-dense":
            converted = to_sparse24(model, kernel.split("-")[0])
        forward = torch.compile(model) if args.compile else model
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prefill), device="cuda")
        ms = median_ms(
            lambda f=forward, ids=ids: f(input_ids=ids, use_cache=False, logits_to_keep=1), 3, args.prefill_iters
        )
        result[kernel] = {"ms": ms, "tokens_per_second": args.batch * args.prefill / ms * 1e3, "conversion": converted}
        print(f"prefill {name} {kernel}: {ms:.1f} ms", flush=True)
        del model, forward
        torch.cuda.empty_cache()
    for kernel in result:
        result[kernel]["speedup_vs_bf16_dense"] = result["bf16-dense"]["ms"] / result[kernel]["ms"]
    result["fp8_24_speedup_vs_fp8_dense"] = result["fp8-dense"]["ms"] / result["fp8-2:4"]["ms"]
    return result


def builtin_24(spec: str):  # noqa: ANN201
    from sparsefit.models import load_model
    from sparsefit.pruning import OneShotConfig, oneshot

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
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="rows of x per linear")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefill", type=int, default=2048, help="tokens per sequence of the prefill")
    p.add_argument("--blocks", type=int, default=4, help="blocks of the Llama-3-8B-shaped stack")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--prefill-iters", type=int, default=10)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="benchmarks/results/sparse24_gpu.json")
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("this benchmark needs an NVIDIA GPU of compute capability 9.0 (Hopper); nothing was measured")
    try:
        import torchao
    except ImportError:
        sys.exit("this benchmark needs torchao: pip install 'sparsefit[gpu]'")

    from sparsefit.models import load_model

    config = load_model(args.model, "bfloat16", "cpu").config
    model_shapes = shapes(
        config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads
    )
    result = {
        "benchmark": "sparse24_gpu",
        "environment": {**environment("cuda"), "torchao": torchao.__version__},
        "args": vars(args),
        "per_linear": per_linear(args, model_shapes),
    }
    write_json(args.out, result)
    result["prefill"] = {
        args.model: prefill(args, args.model, lambda: builtin_24(args.model)),
        f"llama-3-8b-{args.blocks}-blocks": prefill(args, "llama-3-8b", lambda: llama3_8b_stack(args.blocks)),
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
