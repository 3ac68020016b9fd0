"""Every option of generation through the runtime, with its default; validated on construction.

Kept free of torch so that the command line builds its flags from it quickly. `sparsefit generate`
and `sparsefit serve` read their defaults here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_NEW_TOKENS = 1 << 20  # far above any context; the model's own context is checked at run time


class RuntimeOptions(BaseModel):
    """How a model is loaded into the runtime."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    runtime: Literal["auto", "sparse", "dense", "hf"] = Field(
        "auto",
        description="sparse: the packed sparse kernels and lean decode loop | dense: the same loop on torch's "
        "dense matmuls (same bf16 weights) | hf: plain transformers generate, the yardstick | auto (default): "
        "sparse where the model's family has the fast decoder and the kernels built, else hf",
    )
    values: Literal["bfloat16", "int8"] | None = Field(
        None,
        description="stored values of the packed weights: bfloat16, or int8 with one scale per output row "
        "(default: int8 for a per-channel int8 checkpoint, else bfloat16)",
    )
    isa: Literal["auto", "avx512", "avx512bf16", "amx", "avx2"] = Field(
        "auto",
        description="instruction set of the kernels: auto (default: avx512bf16 where the CPU has "
        "AVX512-BF16, inputs rounded to bf16; else avx512, else avx2, fp32 inputs) | amx (opt-in: "
        "faster from batch 2 up, slower at batch 1)",
    )
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads (default: torch's, one per core)")


class GenerateOptions(RuntimeOptions):
    """Sampling and stopping of one generation."""

    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS, description="tokens to generate at most")
    ignore_eos: bool = Field(False, description="go on past end-of-text: exactly max_new_tokens tokens")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 (default): greedy; above 0: sample")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: keep the top tokens of this mass")
    top_k: int = Field(0, ge=0, le=1 << 20, description="sample among the k most likely tokens (0: all)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="sampling seed (default: random)")
    stop: list[str] = Field([], description="stop strings: the text ends before the first one")
    chat: bool = Field(False, description="wrap the prompt in the model's chat template")


class ServeOptions(RuntimeOptions):
    """How `sparsefit serve` listens and schedules: the OpenAI-compatible server over the runtime."""

    runtime: Literal["auto", "sparse", "dense"] = Field(
        "auto",
        description="sparse: the packed sparse kernels | dense: the same decode loop on torch's dense matmuls | "
        "auto (default): sparse where the kernels are built, else dense",
    )
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on (default 127.0.0.1: loopback)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port, printed at start)")
    api_key: str | None = Field(
        None, min_length=1, description="require 'Authorization: Bearer KEY' on /v1/* (default: no key)"
    )
    model_name: str | None = Field(None, min_length=1, description="model id clients send (default: --model)")
    max_batch: int = Field(16, ge=1, le=1024, description="requests decoded together: the KV cache's slots")
    max_model_len: int | None = Field(
        None, ge=2, le=1 << 20, description="tokens per request, prompt plus completion (default: the model's "
        "context, at most 2048)",
    )  # fmt: skip
    max_queue: int = Field(64, ge=0, le=1 << 16, description="requests waiting for a slot before new ones get 429")
    prefill_chunk: int = Field(512, ge=1, le=1 << 16, description="prompt tokens prefilled per decode step")
    shutdown_timeout: float = Field(
        5.0, ge=0.0, le=3600.0, description="seconds in-flight requests get to finish on SIGTERM/Ctrl-C"
    )


DEFAULT_MAX_MODEL_LEN = 2048  # the KV cache grows with slots x tokens: a longer context is one flag away
