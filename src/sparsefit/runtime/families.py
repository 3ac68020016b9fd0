"""The model families the fast decoder runs (`csrc/llama.cpp`), one row each.

These families share Llama's block: RMSNorm, rotary attention with grouped key/value heads, a
SiLU-gated MLP, and transformers' checkpoint names for them. A row says what varies: where the
family's rotary embedding lives (so its own class computes the tables, rope scaling included) and
how its config states a sliding window. Biases (Qwen2's q/k/v) and per-head q/k norms (Qwen3) are
read from the checkpoint itself. A family not listed has no sparse runtime: `generate` runs it
on plain transformers `generate` (`--runtime hf`) and `serve` refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    rotary: str  # "module:Class" of the family's rotary embedding in transformers
    window_flag: str | None = None  # config flag that switches the sliding window on (None: always on if set)


FAMILIES: dict[str, Family] = {
    "llama": Family("transformers.models.llama.modeling_llama:LlamaRotaryEmbedding"),
    "mistral": Family("transformers.models.mistral.modeling_mistral:MistralRotaryEmbedding"),
    "qwen2": Family("transformers.models.qwen2.modeling_qwen2:Qwen2RotaryEmbedding", "use_sliding_window"),
    "qwen3": Family("transformers.models.qwen3.modeling_qwen3:Qwen3RotaryEmbedding", "use_sliding_window"),
}

# Checkpoint names inside block i (`model.layers.{i}.`), in the fused order of the packed weights.
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OUT = "self_attn.o_proj"
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
DOWN = "mlp.down_proj"
NORMS = ("input_layernorm", "post_attention_layernorm")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
