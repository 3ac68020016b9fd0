"""The Llama-family decoder on packed weights: the model a decode step runs.

`Decoder` holds every weight packed (`runtime.packing`) and nothing dense: the four linears of each
block (q/k/v fused, o, gate/up fused, down) as `SparseLinear`, the embedding and output layer as
one dense-layout packed table (shared when the checkpoint ties them). `forward` takes any set of
tokens, each with its cache row and position, so one call is a prefill, a decode step over many
rows, or both (continuous batching); `csrc/llama.cpp` computes the blocks in one operator call,
`reference.py` the same in torch (the `dense` runtime and the tests' oracle).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsefit.errors import UsageError
from sparsefit.runtime import families as fam
from sparsefit.runtime.checkpoint import CheckpointTensors
from sparsefit.runtime.kernels import choose_isa
from sparsefit.runtime.linear import SparseLinear


@dataclass(frozen=True)
class DecoderShape:
    """What the operator needs of the config (`llama_decoder`'s config list, in order)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    row_block: int
    window: int  # 0: attend to every earlier position
    layers: int
    eps: float
    vocab: int
    max_positions: int

    def as_ints(self) -> list[int]:
        return [self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate, self.row_block,
                self.window, self.layers]  # fmt: skip


@dataclass
class KVCache:
    """Keys and values of every layer: (slots, kv_heads, capacity, head_dim) float32, preallocated."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, shape: DecoderShape, slots: int, capacity: int) -> KVCache:
        size = (slots, shape.kv_heads, capacity, shape.head_dim)
        return cls([torch.zeros(size) for _ in range(shape.layers)], [torch.zeros(size) for _ in range(shape.layers)])

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def decoder_shape(config: dict, row_block: int) -> DecoderShape:
    """The shape from a config.json dict; a UsageError for a family or option the decoder lacks."""
    model_type = config.get("model_type")
    if model_type not in fam.FAMILIES:
        raise UsageError(
            f"the sparse runtime's decoder runs {', '.join(fam.FAMILIES)} models, not '{model_type}'; "
            "use --runtime hf (transformers' modules)"
        )
    family = fam.FAMILIES[model_type]
    hidden, heads = _field(config, "hidden_size"), _field(config, "num_attention_heads")
    head_dim = _field(config, "head_dim", hidden // heads)
    window = config.get("sliding_window") or 0
    if family.window_flag is not None and not config.get(family.window_flag, False):
        window = 0
    layer_types = set(config.get("layer_types") or [])
    if window and layer_types and layer_types != {"sliding_attention"}:
        raise UsageError(f"'{model_type}' mixes sliding and full attention layers; use --runtime hf")
    if config.get("hidden_act", "silu") != "silu":
        raise UsageError(f"the decoder's MLP is SiLU-gated; this model uses {config.get('hidden_act')}: --runtime hf")
    kv_heads = _field(config, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise UsageError(
            f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    eps = config.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise UsageError(f"config.json: rms_norm_eps must be a number in (0, 1), got {eps!r}")
    return DecoderShape(
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=_field(config, "intermediate_size"),
        row_block=row_block,
        window=_field(config, "sliding_window", 0, low=0) if window else 0,
        layers=_field(config, "num_hidden_layers"),
        eps=float(eps),
        vocab=_field(config, "vocab_size"),
        max_positions=_field(config, "max_position_embeddings", 2048, high=MAX_POSITIONS),
    )


MAX_DIM = 1 << 20  # no decoder dimension (hidden, heads, vocab, layers) of any model comes near this
MAX_POSITIONS = 1 << 21  # the rotary tables are (positions, head_dim) float32, allocated whole


def _field(config: dict, key: str, default: int | None = None, low: int = 1, high: int = MAX_DIM) -> int:
    """An integer field of config.json within [low, high], or a UsageError naming it."""
    value = config.get(key)
    if value is None and default is not None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"config.json: {key} must be an integer from {low} to {high}, got {value!r}")
    return value


def check_tensors(shape: DecoderShape, src: CheckpointTensors) -> None:
    """A UsageError naming the tensor whose shape the config does not imply, before anything is packed
    (the operator trusts these shapes; a mismatch must never reach it)."""
    attn, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    h, inter = shape.hidden, shape.intermediate
    linears = {fam.QKV[0]: (attn, h), fam.QKV[1]: (kv, h), fam.QKV[2]: (kv, h), fam.OUT: (h, attn),
               fam.GATE_UP[0]: (inter, h), fam.GATE_UP[1]: (inter, h), fam.DOWN: (h, inter)}  # fmt: skip
    expected = {"model.embed_tokens.weight": (shape.vocab, h), "model.norm.weight": (h,)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        if not src.has_linear(p + fam.DOWN):  # the first missing block: name it, not 7 of its tensors
            raise UsageError(f"config.json says num_hidden_layers {shape.layers}, but the weights lack block {i}")
        expected.update({f"{p}{n}.weight": (h,) for n in fam.NORMS})
        for name, dims in linears.items():
            got = src.linear_shape(p + name)
            if got != dims:
                raise UsageError(f"tensor {p}{name} is {got}, but config.json implies {dims}")
    if "lm_head.weight" in src:
        expected["lm_head.weight"] = (shape.vocab, h)
    for key, dims in expected.items():
        got = src.shape(key)
        if got != dims:
            raise UsageError(f"tensor {key} is {got}, but config.json implies {dims}")


def rotary_tables(config: dict, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (positions, head_dim) from the family's own rotary embedding (rope scaling included)."""
    from transformers import AutoConfig

    module, name = fam.FAMILIES[config["model_type"]].rotary.split(":")
    rotary_cls = getattr(importlib.import_module(module), name)
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("quantization_config",)})
    rotary = rotary_cls(config=hf_config)
    ids = torch.arange(positions)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), ids)
    return cos[0].float().contiguous(), sin[0].float().contiguous()


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qkv: SparseLinear
    o: SparseLinear
    gate_up: SparseLinear
    down: SparseLinear


class Decoder:
    """A Llama-family causal LM on packed weights (see the module docstring)."""

    def __init__(
        self,
        shape: DecoderShape,
        layers: list[Layer],
        norm: torch.Tensor,
        head: SparseLinear,
        embed: SparseLinear,
        cos: torch.Tensor,
        sin: torch.Tensor,
        isa: str,
    ) -> None:
        self.shape, self.layers, self.norm, self.head, self.embed = shape, layers, norm, head, embed
        self.cos, self.sin, self.isa = cos, sin, isa
        self._weights = [t for layer in layers for t in _layer_tensors(layer)]
        self._config = shape.as_ints()

    @property
    def weight_bytes(self) -> int:
        """Resident bytes of every weight (packed linears, norms, embedding / head once when tied)."""
        tables = {id(self.head): self.head, id(self.embed): self.embed}
        norms = [self.norm, *(t for layer in self.layers for t in (layer.ln1, layer.ln2, layer.q_norm, layer.k_norm)
                              if t is not None)]  # fmt: skip
        linears = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return sum(m.nbytes for m in (*linears, *tables.values())) + sum(t.numel() * 4 for t in norms)

    def new_cache(self, slots: int, capacity: int) -> KVCache:
        return KVCache.allocate(self.shape, slots, capacity)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed
        return torch.ops.sparsefit.packed_rows(
            e.values, e.block_offsets, e.scales, e.out_features, e.in_features, e.row_block, tokens
        )

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, cache: KVCache, last: torch.Tensor
    ) -> torch.Tensor:
        """Logits (len(last), vocab) at the tokens indexed by `last`; writes every token's keys and
        values into `cache` at (row, position)."""
        x = self.embed_tokens(tokens)
        h = torch.ops.sparsefit.llama_decoder(
            x, rows, positions, self.cos, self.sin, cache.k, cache.v, self._weights, self._config,
            self.shape.eps, self.isa,
        )  # fmt: skip
        h = F.rms_norm(h[last], (self.shape.hidden,), self.norm, self.shape.eps)
        return self.head(h)


def _layer_tensors(layer: Layer) -> list[torch.Tensor]:
    empty = torch.empty(0)
    out = [layer.ln1, layer.ln2, layer.q_norm if layer.q_norm is not None else empty,
           layer.k_norm if layer.k_norm is not None else empty]  # fmt: skip
    for m in (layer.qkv, layer.o, layer.gate_up, layer.down):
        out += [m.masks, m.values, m.block_offsets, m.scales if m.scales is not None else empty,
                m.bias if m.bias is not None else empty]  # fmt: skip
    return out


def _fused(
    src: CheckpointTensors, names: list[str], values: str, layout: str, isa: str, row_block: int
) -> SparseLinear:
    """One packed linear from the rows of several (q, k, v or gate, up), read one at a time."""
    weights = [src.linear(n) for n in names]
    biases = [src.tensor(f"{n}.bias").float() if f"{n}.bias" in src else None for n in names]
    weight = torch.cat([w.weight for w in weights]) if len(weights) > 1 else weights[0].weight
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(w.weight.shape[0]) for b, w in zip(biases, weights)])
    scales = None
    if values == "int8" and all(w.scales is not None for w in weights):  # the checkpoint's own codes
        scales = torch.cat([w.scales for w in weights])
    return SparseLinear.from_weight(weight, bias, values, layout, isa, scales, row_block)


def load_decoder(
    src: CheckpointTensors,
    values: str = "bfloat16",
    layout: str = "auto",
    head_values: str | None = None,
    isa: str | None = None,
    row_block: int = 8,
    progress: bool = False,
) -> Decoder:
    """Pack the checkpoint's weights one linear at a time (peak: what is packed plus one block).

    `values`: bfloat16 | int8 for the block linears; `head_values` for the embedding / output table
    (default: the same); `layout`: auto | bitmask | dense (see `SparseLinear.from_weight`)."""
    from tqdm.auto import tqdm

    from sparsefit.models.offload import release_free_heap

    config = src.config
    shape = decoder_shape(config, row_block)
    check_tensors(shape, src)
    isa = choose_isa(isa)
    layers = []
    for i in tqdm(range(shape.layers), desc="pack", unit="layer", disable=not progress):
        p = f"model.layers.{i}."
        qn, kn = (f"{p}{n}.weight" for n in fam.QK_NORMS)
        layers.append(
            Layer(
                ln1=src.tensor(f"{p}{fam.NORMS[0]}.weight").float().contiguous(),
                ln2=src.tensor(f"{p}{fam.NORMS[1]}.weight").float().contiguous(),
                q_norm=src.tensor(qn).float().contiguous() if qn in src else None,
                k_norm=src.tensor(kn).float().contiguous() if kn in src else None,
                qkv=_fused(src, [p + n for n in fam.QKV], values, layout, isa, row_block),
                o=_fused(src, [p + fam.OUT], values, layout, isa, row_block),
                gate_up=_fused(src, [p + n for n in fam.GATE_UP], values, layout, isa, row_block),
                down=_fused(src, [p + fam.DOWN], values, layout, isa, row_block),
            )
        )
        release_free_heap()  # the block's dense temporaries, so resident memory stays near what is packed
    head_values = head_values or values

    def table(key: str) -> SparseLinear:  # read and packed 4096 rows at a time
        rows, cols = src.shape(key)
        return SparseLinear.from_chunks(src.row_chunks(key, 4096), cols, head_values, isa, row_block, rows)

    embed = table("model.embed_tokens.weight")
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in src
    release_free_heap()
    if tied:
        head = embed
    else:
        head = SparseLinear.from_chunks(
            src.row_chunks("lm_head.weight", 4096), shape.hidden, head_values, isa, row_block
        )
    cos, sin = rotary_tables(config, shape.max_positions)
    return Decoder(shape, layers, src.tensor("model.norm.weight").float().contiguous(), head, embed, cos, sin, isa)
