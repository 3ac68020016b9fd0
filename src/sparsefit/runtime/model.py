"""Loading a checkpoint into the runtime, and generating from it.

`load_runtime(spec)` packs any sparsefit checkpoint (a builtin name, a checkpoint directory of any
export format, a .gguf file) into a `RuntimeModel`: the decoder, its tokenizer and end-of-text
tokens. `runtime="sparse"` (default) runs the packed kernels; `"dense"` runs `reference.py` on the
same bfloat16 weights with torch's dense matmuls (its inputs rounded as the kernels round them).
Weights are read one tensor at a time, so the dense model is never built (except from a .gguf
file, which transformers dequantizes whole).
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsefit.errors import UsageError
from sparsefit.runtime.checkpoint import CheckpointTensors
from sparsefit.runtime.engine import Engine, Event, Request, run_requests
from sparsefit.runtime.sampling import Sampling

RUNTIMES = ("sparse", "dense")
VALUE_TYPES = ("bfloat16", "int8")


@dataclass
class RuntimeModel:
    decoder: object  # runtime.decoder.Decoder | runtime.reference.ReferenceDecoder
    tokenizer: object
    eos: set[int]
    runtime: str
    kernel: str  # the instruction set of the packed kernels, or "torch"
    values: str
    source: str
    load_seconds: float = 0.0

    @property
    def context(self) -> int:
        return self.decoder.shape.max_positions

    @property
    def weight_bytes(self) -> int:
        return self.decoder.weight_bytes


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def checkpoint_config(spec: str) -> dict:
    """The config.json of `spec` as a dict (fetched from the hub for a hub id)."""
    folder = _checkpoint_folder(spec)
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read the config.json of '{spec}' ({err}); pass a checkpoint directory") from None


def _checkpoint_folder(spec: str) -> Path:
    """The local checkpoint folder of `spec`."""
    from sparsefit.models import resolve_model

    resolved = resolve_model(spec)
    if resolved.source == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(resolved.path, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        except Exception as err:  # noqa: BLE001 - any hub failure is one line
            raise UsageError(f"could not fetch '{spec}' from the hub ({err}); pass a local checkpoint") from None
    if resolved.source == "gguf":
        raise UsageError(
            f"'{spec}' is a GGUF file; the sparse runtime packs safetensors checkpoints: convert it once with "
            f"`sparsefit export --model {spec} --output DIR`, then pass DIR"
        )
    return Path(resolved.path)


def _eos_ids(folder: Path, tokenizer: object) -> set[int]:
    ids = {tokenizer.eos_token_id} if isinstance(tokenizer.eos_token_id, int) else set()
    try:
        gen = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        gen = None
    ids |= {gen} if isinstance(gen, int) else {t for t in gen or [] if isinstance(t, int)}
    return ids


def load_runtime(
    spec: str,
    runtime: str = "sparse",
    values: str | None = None,
    isa: str | None = None,
    progress: bool = True,
) -> RuntimeModel:
    """Pack `spec` for the runtime (see the module docstring). `values`: bfloat16 | int8 (default:
    int8 when the checkpoint stores per-channel int8 codes, else bfloat16)."""
    from sparsefit.models import load_tokenizer

    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime '{runtime}'; use one of: {', '.join(RUNTIMES)}, hf")
    if values is not None and values not in VALUE_TYPES:
        raise UsageError(f"unknown value type '{values}'; use one of: {', '.join(VALUE_TYPES)}")
    start = time.perf_counter()
    folder = _checkpoint_folder(spec)
    src = CheckpointTensors(folder)
    if values is None:
        quant = src.quantization.get("config_groups") or {}
        weights = [g.get("weights") or {} for g in quant.values()]
        per_channel_int8 = any(w.get("num_bits") == 8 and w.get("strategy") == "channel" for w in weights)
        values = "int8" if per_channel_int8 else "bfloat16"
    if runtime == "sparse":
        from sparsefit.runtime.decoder import load_decoder
        from sparsefit.runtime.kernels import choose_isa

        try:
            isa = choose_isa(isa)
        except ValueError as err:
            raise UsageError(f"{err}; use --runtime dense or --runtime hf") from None
        decoder = load_decoder(src, values, isa=isa, progress=progress)
        kernel = isa
    else:
        from sparsefit.runtime.kernels import choose_isa, input_dtype
        from sparsefit.runtime.reference import ReferenceDecoder

        # The sparse runtime's arithmetic on this CPU (inputs rounded to bf16 where its kernels do
        # that) by torch's dense matmuls: the reference its greedy tokens are checked against.
        try:
            inputs = input_dtype(choose_isa(isa), "bfloat16")
        except ValueError:
            inputs = torch.float32
        decoder, kernel, values = ReferenceDecoder(src, inputs), "torch", "bfloat16"
    tokenizer = load_tokenizer(str(folder))
    return RuntimeModel(decoder, tokenizer, _eos_ids(folder, tokenizer), runtime, kernel, values, spec,
                        time.perf_counter() - start)  # fmt: skip


@dataclass
class GenerateResult:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: list[int]
    stats: dict = field(default_factory=dict)


def encode_prompt(tokenizer: object, prompt: str, chat: bool = False) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat needs a tokenizer with a chat template; drop --chat for the plain prompt")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def generate(
    model: RuntimeModel,
    prompts: list[str],
    max_new_tokens: int = 256,
    sampling: Sampling | None = None,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
    slots: int | None = None,
    chat: bool = False,
    on_event: Callable[[Event], None] | None = None,
) -> GenerateResult:
    """Continuations of `prompts` through the engine: all of them in `slots` concurrent rows
    (default: all at once, up to 64)."""
    sampling = sampling or Sampling()
    encoded = [encode_prompt(model.tokenizer, p, chat) for p in prompts]
    longest = max(len(e) for e in encoded)
    capacity = min(model.context, longest + max_new_tokens)
    if longest + max_new_tokens > model.context:
        raise UsageError(
            f"the longest prompt ({longest} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {model.context}; shorten one of them"
        )
    engine = Engine(model.decoder, model.tokenizer, slots or min(len(prompts), 64), capacity, model.eos)
    requests = [Request(e, max_new_tokens, sampling, tuple(stop), ignore_eos) for e in encoded]
    out = run_requests(engine, requests, on_event)
    s = engine.stats
    stats = {
        "prefill_tokens": s.prefill_tokens,
        "prefill_seconds": s.prefill_seconds,
        "prefill_tokens_per_s": s.prefill_tokens / s.prefill_seconds if s.prefill_seconds else 0.0,
        "decode_tokens": s.decode_tokens,
        "decode_seconds": s.decode_seconds,
        "decode_tokens_per_s": s.decode_tokens / s.decode_seconds if s.decode_seconds else 0.0,
        "steps": s.steps,
        "kv_cache_bytes": engine.cache.nbytes,
    }
    return GenerateResult([o["text"] for o in out], [o["token_ids"] for o in out], [o["finish_reason"] for o in out],
                          [len(e) for e in encoded], stats)  # fmt: skip
