"""Per-architecture facts, one row per supported family (`config.model_type`).

Each row names the module list of the decoder blocks and, in forward order, the linears of a
block that take one and the same input. The layer-by-layer driver collects one set of statistics
per group (one X^T X for q/k/v, one for gate/up) and prunes a group's linears together.

A family not listed falls back to a generic rule, with a one-line warning: the blocks are the
longest `nn.ModuleList` of the model and every linear is a group of its own (correct, but each
shared input then costs one X^T X per linear). `tests/models/test_architectures.py` checks every
row on a tiny model: the block list is found and each group's linears do receive equal inputs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    blocks: str  # module path of the decoder block list
    groups: tuple[tuple[str, ...], ...]  # names inside a block of linears fed one input, in forward order


# Llama and the families that kept its module names.
_LLAMA = Architecture(
    blocks="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "opt": Architecture(
        blocks="model.decoder.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    # GPT-2 fuses q/k/v into one Conv1D (weight stored (in, out)): nothing left to share.
    "gpt2": Architecture(
        blocks="transformer.h",
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    ),
}
