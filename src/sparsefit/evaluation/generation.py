"""Greedy batched generation: continuous batching over a slot cache, stop strings, a new-token bound.

`generate_texts` runs the sparse runtime's decoder (`sparsefit.runtime`: packed bf16 weights, the
kernels) for the families it serves, and `generate_greedy` (transformers' own modules in float32,
token for token what `generate` gives) for the rest or when asked.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from sparsefit.errors import UsageError
from sparsefit.runtime.hf_cache import SlotCache, prefill, with_cache

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def truncate_at_stops(text: str, stops: list[str]) -> str:
    """Cut a generation at the first occurrence of each stop string (as the harness does)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


COMPACT_EVERY = 64  # decode steps between two compactions of the slot cache at the least


@dataclass
class _Row:
    """A prompt in decoding: its index, the tokens generated so far, its next position, its first column."""

    index: int
    tokens: list[int]
    position: int
    start: int


RUNTIMES = ("auto", "sparse", "hf")


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    stops: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 64,
    runtime: str = "auto",
    progress: bool = True,
) -> tuple[list[str], dict]:
    """Greedy continuations through the runtime `runtime` (auto: sparse where the model's family has
    the fast decoder and the kernels built, else hf), and throughput statistics."""
    from sparsefit.runtime.families import FAMILIES
    from sparsefit.runtime.kernels import load_kernels

    if runtime not in RUNTIMES:
        raise UsageError(f"unknown generation runtime '{runtime}'; use one of: {', '.join(RUNTIMES)}")
    fast = model.config.model_type in FAMILIES and next(model.parameters()).device.type == "cpu"
    if runtime == "sparse" and not (fast and load_kernels().available):
        raise UsageError(f"the sparse runtime cannot run this model ({model.config.model_type}); use --runtime hf")
    if runtime == "hf" or not (fast and load_kernels().available):
        texts, stats = generate_greedy(model, tokenizer, prompts, stops, max_new_tokens, batch_size, progress)
        return texts, {**stats, "runtime": "hf"}
    return _generate_sparse(model, tokenizer, prompts, stops, max_new_tokens, batch_size, progress)


def _generate_sparse(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    stops: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
) -> tuple[list[str], dict]:
    from sparsefit.runtime.checkpoint import ModelTensors
    from sparsefit.runtime.decoder import load_decoder
    from sparsefit.runtime.engine import Engine, Request

    decoder = load_decoder(ModelTensors(model))
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    eos = {t for t in (tokenizer.eos_token_id, model.generation_config.eos_token_id) if isinstance(t, int)}
    capacity = min(decoder.shape.max_positions, max(len(e) for e in encoded) + max_new_tokens)
    engine = Engine(decoder, tokenizer, min(batch_size, len(prompts)), capacity, eos)
    stops = tuple(s for s in stops if s)
    ids = {engine.submit(Request(e, max_new_tokens, stop=stops)): i for i, e in enumerate(encoded)}
    outputs = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    start, new_tokens = time.perf_counter(), 0
    while engine.busy:
        for event in engine.step():
            outputs[ids[event.request]] += event.text
            new_tokens += len(event.tokens)
            bar.update(event.finish_reason is not None)
    bar.close()
    seconds = time.perf_counter() - start
    stats = {"generated_tokens": new_tokens, "seconds": seconds, "tokens_per_second": new_tokens / seconds}
    return outputs, {**stats, "runtime": f"sparse ({decoder.isa}, bfloat16)"}


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    stops: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[list[str], dict]:
    """Greedy continuations of `prompts`, in the input order, and throughput statistics.

    Continuous batching over `batch_size` slots (`runtime/hf_cache.py`): a row leaves as soon as it
    emits EOS, a stop string (looked for in its last 10 tokens, as the harness's stopping criterion
    does) or `max_new_tokens` tokens, and a waiting prompt takes its slot, so no slot decodes
    padding while the batch's longest row finishes. Each row's tokens are what `generate` would
    give it (greedy, float32); the tests check this against `generate`.
    """
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(encoded[i])))  # long prompts first
    eos = {t for t in (tokenizer.eos_token_id, model.generation_config.eos_token_id) if isinstance(t, int)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    stops = [s for s in stops if s]
    longest = max(len(e) for e in encoded)
    slots = min(batch_size, len(prompts))
    # A running row spans at most longest + max_new_tokens columns; the slack is how many steps pass
    # between compactions (each copies the live columns once).
    cache = SlotCache(model.config.num_hidden_layers, slots, longest + max_new_tokens + COMPACT_EVERY)
    mask = torch.zeros(slots, cache.capacity, dtype=torch.long)
    rows: list[_Row | None] = [None] * slots
    outputs: list[str] = [""] * len(prompts)
    new_tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)

    def finish(slot: int) -> None:
        nonlocal new_tokens
        row = rows[slot]
        new_tokens += sum(1 for t in row.tokens if t != pad)
        outputs[row.index] = truncate_at_stops(tokenizer.decode(row.tokens, skip_special_tokens=True), stops)
        rows[slot] = None
        bar.update(1)

    def done(row: _Row) -> bool:
        tail = tokenizer.decode(row.tokens[-10:]) if stops else ""
        return row.tokens[-1] in eos or len(row.tokens) >= max_new_tokens or any(s in tail for s in stops)

    def refill() -> None:
        free = [s for s, r in enumerate(rows) if r is None][: len(waiting)]
        taken = [waiting.popleft() for _ in free]
        logits, prefilled, pmask = prefill(model, [encoded[i] for i in taken], pad)
        width = pmask.shape[1]
        if width > cache.column:  # room on the left for the longest new prompt
            offset = width - cache.column
            mask[:, offset:width] = mask[:, : cache.column].clone()
            mask[:, :offset] = 0
            cache.shift(offset)
            for row in rows:
                if row is not None:
                    row.start += offset
        index = torch.tensor(free)
        cache.place(index.to(device), prefilled, width)
        mask[index] = 0
        mask[index, cache.column - width : cache.column] = pmask
        for slot, i, token in zip(free, taken, logits.argmax(-1).tolist()):
            rows[slot] = _Row(i, [token], len(encoded[i]), cache.column - len(encoded[i]))
            if done(rows[slot]):
                finish(slot)

    while waiting or any(rows):
        free = sum(r is None for r in rows)
        if waiting and (free >= max(1, slots // 4) or free == slots):
            refill()
            continue
        active = [s for s, r in enumerate(rows) if r is not None]
        if not waiting and len(active) <= len(rows) // 2:  # the tail: decode only the rows still running
            keep = torch.tensor(active)
            cache.keep(keep.to(device))
            mask, rows = mask[keep], [rows[s] for s in active]
            active = list(range(len(rows)))
        if cache.column + 1 > cache.capacity:  # drop the columns no running row reaches back to
            first = min(rows[s].start for s in active)
            mask[:, : cache.column - first] = mask[:, first : cache.column].clone()
            mask[:, cache.column - first :] = 0
            cache.shift(-first)
            for s in active:
                rows[s].start -= first
        c = cache.column
        mask[:, c] = 1  # an idle slot attends to its own token: no row is all masked (that gives NaN)
        tokens = torch.tensor([[r.tokens[-1] if r else pad] for r in rows])
        positions = torch.tensor([[r.position if r else 0] for r in rows])
        out = model(
            input_ids=tokens.to(device),
            attention_mask=mask[:, : c + 1].to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **with_cache(model, cache),
        )
        cache.column = c + 1
        for s, token in enumerate(out.logits[:, -1].argmax(-1).tolist()):
            if rows[s] is None:
                mask[s, c] = 0
                continue
            rows[s].tokens.append(token)
            rows[s].position += 1
            if done(rows[s]):
                finish(s)
    bar.close()
    seconds = time.perf_counter() - start
    return outputs, {"generated_tokens": new_tokens, "seconds": seconds, "tokens_per_second": new_tokens / seconds}
