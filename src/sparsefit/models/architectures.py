"""Per-architecture facts, one row per supported family (`config.model_type`).

Each row names the module list of the decoder blocks and, in forward order, the linears of a
block that take one and the same input. The layer-by-layer driver collects one set of statistics
per group (one X^T X for q/k/v, one for gate/up) and prunes a group's linears together.

A family not listed falls back to a generic rule, with a one-line warning: the blocks are the
longest `nn.ModuleList` of the model and every linear is a group of its own (correct, but each
shared input then costs one X^T X per linear). `tests/models/test_architectures.py` checks every
row on a tiny model: the block list is found and each group's linears do receive equal inputs.

Mixture-of-experts rows also name the module holding the fused expert tensors (transformers 5.x
keeps every expert's matrices as one parameter of shape (experts, out, in)) and the routers, which
stay dense. Each expert matrix is pruned as a linear of its own, from the tokens routed to it
(`models.experts` captures them at the experts module's input).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FusedExperts:
    """Expert weights fused into 3-D parameters (experts, out, in) of one module of the block.

    `forward(hidden (tokens, hidden), top_k_index (tokens, k), top_k_weights)` is the module's call,
    as transformers 5.x's Qwen3-MoE, Mixtral, OLMoE and Qwen2-MoE experts take it; `gate_up` is fed the
    routed tokens, `down` the activation of gate times up (`act_fn(gate) * up`, gate the first half).
    """

    module: str = "mlp.experts"  # inside a block
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    # GPT-OSS: parameters stored (experts, in, out), each with a `<param>_bias` (experts, out) beside it,
    # gate and up interleaved in gate_up's outputs and combined by the module's own clamped `_apply_gate`.
    transposed: bool = False
    index_arg: str = "top_k_index"  # the name of the call's second argument, the routing
    activation: str = "act_fn"  # "act_fn": act_fn(gate) * up, gate the first half | "apply_gate"


@dataclass(frozen=True)
class Architecture:
    blocks: str  # module path of the decoder block list
    groups: tuple[tuple[str, ...], ...]  # names inside a block of linears fed one input, in forward order
    experts: FusedExperts | None = None
    # Modules inside a block whose weights route tokens (or gate a shared expert): kept dense, measured apart.
    routers: tuple[str, ...] = ()


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

_ATTENTION = _LLAMA.groups[:2]
# Qwen3-MoE, Mixtral, OLMoE: Llama attention, routed experts only (router `mlp.gate`).
_ROUTED = Architecture(blocks="model.layers", groups=_ATTENTION, experts=FusedExperts(), routers=("mlp.gate",))

_DEEPSEEK = Architecture(
    blocks="model.layers",
    groups=(
        ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
        ("self_attn.q_b_proj",),
        ("self_attn.kv_b_proj",),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
        ("mlp.down_proj",),
        ("mlp.shared_experts.down_proj",),
    ),
    experts=FusedExperts(),
    routers=("mlp.gate",),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    # Gemma 2/3 and OLMo 2 keep Llama's names (their extra norms are not linears).
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "olmo2": _LLAMA,
    # Phi-3/4 fuse q/k/v and gate/up into one linear each.
    "phi3": Architecture(
        blocks="model.layers",
        groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    "qwen3_moe": _ROUTED,
    "mixtral": _ROUTED,
    "olmoe": _ROUTED,
    # Qwen2-MoE adds a shared expert (a dense MLP, pruned as one) behind a one-output sigmoid gate.
    "qwen2_moe": Architecture(
        blocks="model.layers",
        groups=(
            *_ATTENTION,
            ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
            ("mlp.shared_expert.down_proj",),
        ),
        experts=FusedExperts(),
        routers=("mlp.gate", "mlp.shared_expert_gate"),
    ),
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
    # GPT-OSS: Llama attention (with biases and per-head sinks), routed experts stored (experts, in, out).
    "gpt_oss": Architecture(
        blocks="model.layers",
        groups=_ATTENTION,
        experts=FusedExperts(transposed=True, index_arg="router_indices", activation="apply_gate"),
        routers=("mlp.router",),
    ),
    # DeepSeek-V2/V3: MLA attention (q through a low-rank pair unless q_lora_rank is None; k/v from a
    # compressed latent), a dense MLP in the first `first_k_dense_replace` blocks, routed experts plus
    # shared experts after them.
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
}
