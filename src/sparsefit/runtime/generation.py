"""One generation, measured: what `sparsefit generate` runs. Loads the model into the chosen
runtime, generates (streaming the text of a single prompt), and reports speed, memory and the
kernel that ran."""

from __future__ import annotations

import platform
import sys
from typing import TextIO

import torch

from sparsefit.errors import UsageError
from sparsefit.runtime.config import GenerateOptions
from sparsefit.runtime.sampling import Sampling


def resolve_runtime(spec: str, runtime: str) -> str:
    """`auto`: sparse when the model's family has the fast decoder and the kernels load, else hf."""
    if runtime != "auto":
        return runtime
    from sparsefit.runtime import families
    from sparsefit.runtime.kernels import load_kernels
    from sparsefit.runtime.model import checkpoint_config

    model_type = checkpoint_config(spec).get("model_type")
    if model_type in families.FAMILIES and load_kernels().available:
        return "sparse"
    print(f"notice: running '{spec}' ({model_type}) on plain transformers (--runtime hf)", file=sys.stderr)
    return "hf"


def run_generate(spec: str, prompts: list[str], options: GenerateOptions, stream: TextIO | None = None) -> dict:
    from sparsefit.runtime.model import generate, load_runtime, peak_rss_bytes

    if options.threads:
        torch.set_num_threads(options.threads)
    sampling = Sampling(options.temperature, options.top_p, options.top_k, options.seed)
    runtime = resolve_runtime(spec, options.runtime)
    if runtime == "hf":
        return _run_hf(spec, prompts, options, sampling, stream)
    isa = None if options.isa == "auto" else options.isa
    model = load_runtime(spec, runtime, options.values, isa, progress=stream is not None)

    def on_event(event: object) -> None:
        stream.write(event.text)
        stream.flush()

    result = generate(model, prompts, options.max_new_tokens, sampling, tuple(options.stop), options.ignore_eos,
                      chat=options.chat, on_event=on_event if stream is not None else None)  # fmt: skip
    report = {
        "model": spec,
        "runtime": runtime,
        "kernel": model.kernel,
        "values": model.values,
        "threads": torch.get_num_threads(),
        "texts": result.texts,
        "token_ids": result.token_ids,
        "finish_reasons": result.finish_reasons,
        "prompt_tokens": result.prompt_tokens,
        "weight_bytes": model.weight_bytes,
        "load_seconds": model.load_seconds,
        **result.stats,
        "peak_rss_bytes": peak_rss_bytes(),
        "machine": platform.machine(),
    }
    if len(prompts) == 1:
        report["text"], report["token_ids"] = result.texts[0], result.token_ids[0]
    return report


def _run_hf(spec: str, prompts: list[str], options: GenerateOptions, sampling: Sampling, stream: TextIO | None) -> dict:
    import time

    from sparsefit.models import load_model_and_tokenizer
    from sparsefit.runtime.hf import hf_generate
    from sparsefit.runtime.model import encode_prompt, peak_rss_bytes

    if options.values == "int8":
        raise UsageError("--values int8 packs weights for the sparse runtime; drop it with --runtime hf")
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(spec, "float32", "cpu")
    load = time.perf_counter() - start
    runs = [hf_generate(model, tokenizer, encode_prompt(tokenizer, p, options.chat), options.max_new_tokens, sampling,
                        tuple(options.stop), options.ignore_eos) for p in prompts]  # fmt: skip
    if stream is not None:
        stream.write(runs[0]["text"])
    prefill_tokens = sum(len(encode_prompt(tokenizer, p, options.chat)) for p in prompts)
    prefill_s, decode_s = sum(r["prefill_seconds"] for r in runs), sum(r["decode_seconds"] for r in runs)
    decode_tokens = sum(r["decode_tokens"] for r in runs)
    report = {
        "model": spec,
        "runtime": "hf",
        "kernel": "torch",
        "values": "float32",
        "threads": torch.get_num_threads(),
        "texts": [r["text"] for r in runs],
        "token_ids": [r["token_ids"] for r in runs],
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "load_seconds": load,
        "prefill_tokens": prefill_tokens,
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else 0.0,
        "decode_tokens": decode_tokens,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
        "machine": platform.machine(),
    }
    if len(prompts) == 1:
        report["text"], report["token_ids"] = runs[0]["text"], runs[0]["token_ids"]
    return report
