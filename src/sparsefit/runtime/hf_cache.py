"""A key/value cache for batched decoding through transformers' own modules, where rows come and go.

Plain `generate` grows its cache by concatenation (a copy of every layer's cache per token) and
keeps decoding a batch until its longest row ends. `SlotCache` preallocates one buffer per layer
for a fixed number of rows ("slots"); every slot writes the current token at one shared column,
and a slot whose row finished takes a new prompt between steps: the prompt is prefilled on its
own and its keys and values are copied into the columns just before the shared one, its padding
masked. Positions are per row (RoPE sees each row's own positions, wherever its columns lie).

It is a `transformers` cache: its layers implement `CacheLayerMixin`, the extension point
transformers gives custom caches, so the model's own attention and masking code runs unchanged.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values: (slots, heads, capacity, head_dim) buffers written at the owner's column."""

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner
        self.k = self.v = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Zeroed buffers for all the owner's slots, shaped like these states (zeros: a masked column must
        stay finite, since attention multiplies its value by a zero weight)."""
        shape = (self.owner.slots, key_states.shape[1], self.owner.capacity)
        self.k = key_states.new_zeros(*shape, key_states.shape[-1])
        self.v = value_states.new_zeros(*shape, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c, n = self.owner.column, key_states.shape[-2]
        self.k[:, :, c : c + n] = key_states
        self.v[:, :, c : c + n] = value_states
        self.keys, self.values = self.k[:, :, : c + n], self.v[:, :, : c + n]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.column + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.column

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """`slots` rows of keys and values, `capacity` columns each; `column` is where the next token goes."""

    def __init__(self, num_layers: int, slots: int, capacity: int) -> None:
        self.slots, self.capacity, self.column = slots, capacity, 0
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def place(self, slots: torch.Tensor, prefilled: DynamicCache, width: int) -> None:
        """Copy a prefill's keys and values (rows in `slots` order, `width` columns) to end at `column`."""
        c = self.column
        for layer, source in zip(self.layers, prefilled.layers):
            if not layer.is_initialized:  # the first prompts size the buffers
                layer.lazy_initialization(source.keys, source.values)
            layer.k[slots, :, c - width : c] = source.keys
            layer.v[slots, :, c - width : c] = source.values

    def shift(self, offset: int) -> None:
        """Move every slot's columns by `offset` (left when negative); `column` moves with them."""
        for layer in (layer for layer in self.layers if layer.is_initialized):
            for buf in (layer.k, layer.v):
                if offset < 0:
                    buf[:, :, : self.column + offset] = buf[:, :, -offset : self.column].clone()
                else:
                    buf[:, :, offset : self.column + offset] = buf[:, :, : self.column].clone()
        self.column += offset

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only these slots, in this order (the batch shrinks as the last rows finish)."""
        self.slots = len(slots)
        for layer in self.layers:
            if layer.is_initialized:
                layer.k, layer.v = layer.k[slots], layer.v[slots]


def with_cache(model: PreTrainedModel, cache: Cache) -> dict:
    """The keyword that passes a cache to `model`'s forward (`cache` in recent transformers, before
    that `past_key_values`)."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


@torch.no_grad()
def prefill(
    model: PreTrainedModel, rows: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """Run left-padded prompts through the model: (last-position logits (n, V), their cache, mask (n, width))."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        logits_to_keep=1,
        **with_cache(model, cache),
    )
    return out.logits[:, -1].float(), cache, mask
