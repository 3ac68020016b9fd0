"""The decoder of `decoder.py` in plain torch: the `dense` runtime and the oracle of the tests.

Same weights as the packed decoder (bfloat16 values, widened to float32 once here), same cache and
same call, each step written out with torch's own ops as transformers' Llama computes it. It keeps
dense float32 copies of every weight: it is the readable yardstick, not the fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsefit.runtime import families as fam
from sparsefit.runtime.checkpoint import CheckpointTensors
from sparsefit.runtime.decoder import DecoderShape, KVCache, decoder_shape, rotary_tables


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


class ReferenceDecoder:
    """`inputs`: the precision each linear's inputs are rounded to first (bfloat16 to follow the
    kernels that multiply bf16 by bf16, `kernels.input_dtype`); float32 leaves them as they are."""

    def __init__(self, src: CheckpointTensors, inputs: torch.dtype = torch.float32) -> None:
        config = src.config
        self.inputs = inputs
        self.shape: DecoderShape = decoder_shape(config, 8)

        def w(name: str) -> torch.Tensor:
            return src.linear(name).weight.to(torch.bfloat16).float()

        def opt(key: str) -> torch.Tensor | None:
            return src.tensor(key).float() if key in src else None

        self.layers = []
        for i in range(self.shape.layers):
            p = f"model.layers.{i}."
            biases = [opt(f"{p}{n}.bias") for n in fam.QKV]
            self.layers.append(
                _Layer(
                    ln1=src.tensor(f"{p}{fam.NORMS[0]}.weight").float(),
                    ln2=src.tensor(f"{p}{fam.NORMS[1]}.weight").float(),
                    q_norm=opt(f"{p}{fam.QK_NORMS[0]}.weight"),
                    k_norm=opt(f"{p}{fam.QK_NORMS[1]}.weight"),
                    qkv=torch.cat([w(p + n) for n in fam.QKV]),
                    qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
                    o=w(p + fam.OUT),
                    gate_up=torch.cat([w(p + n) for n in fam.GATE_UP]),
                    down=w(p + fam.DOWN),
                )
            )
        self.embed = src.tensor("model.embed_tokens.weight").to(torch.bfloat16).float()
        tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in src
        self.head = self.embed if tied else w("lm_head")
        self.norm = src.tensor("model.norm.weight").float()
        self.cos, self.sin = rotary_tables(config, self.shape.max_positions)

    def _in(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.inputs == torch.float32 else h.to(self.inputs).float()

    @property
    def weight_bytes(self) -> int:
        tensors = {id(t): t for layer in self.layers for t in vars(layer).values() if t is not None}
        tensors.update({id(self.embed): self.embed, id(self.head): self.head, id(self.norm): self.norm})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def new_cache(self, slots: int, capacity: int) -> KVCache:
        return KVCache.allocate(self.shape, slots, capacity)

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, cache: KVCache, last: torch.Tensor
    ) -> torch.Tensor:
        s = self.shape
        n, d = tokens.numel(), s.head_dim
        x = self.embed[tokens]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (n, 1, d)
        columns = torch.arange(cache.capacity)
        visible = columns[None] <= positions[:, None]  # (n, capacity): each token sees its row up to itself
        if s.window:
            visible &= columns[None] > positions[:, None] - s.window
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden,), layer.ln1, s.eps)
            qkv = F.linear(self._in(h), layer.qkv, layer.qkv_bias)
            q = qkv[:, : s.heads * d].view(n, s.heads, d)
            k = qkv[:, s.heads * d : (s.heads + s.kv_heads) * d].view(n, s.kv_heads, d)
            v = qkv[:, (s.heads + s.kv_heads) * d :].view(n, s.kv_heads, d)
            if layer.q_norm is not None:
                q = F.rms_norm(q, (d,), layer.q_norm, s.eps)
                k = F.rms_norm(k, (d,), layer.k_norm, s.eps)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.k[i][rows, :, positions] = k
            cache.v[i][rows, :, positions] = v
            keys, values = cache.k[i][rows], cache.v[i][rows]  # (n, kv_heads, capacity, d)
            a = F.scaled_dot_product_attention(
                q[:, :, None], keys, values, attn_mask=visible[:, None, None], enable_gqa=True
            )  # (n, heads, 1, d)
            x = x + F.linear(self._in(a.reshape(n, s.heads * d)), layer.o)
            h = F.rms_norm(x, (s.hidden,), layer.ln2, s.eps)
            gate, up = F.linear(self._in(h), layer.gate_up).chunk(2, -1)
            x = x + F.linear(self._in(F.silu(gate) * up), layer.down)
        h = F.rms_norm(x[last], (s.hidden,), self.norm, s.eps)
        return F.linear(self._in(h), self.head)
