"""The decode loop: continuous batching over a preallocated slot cache (gpt-fast's shape, with
rows that come and go).

`Engine` keeps `slots` rows of keys and values. Each `step()` makes one decoder call holding the
next token of every running row and the prompt tokens of rows being admitted (at most
`prefill_chunk` of them per step, so a long prompt cannot stall the others); a row leaves as soon
as it ends (EOS, a stop string, its token budget) and a waiting request takes its slot at the next
step. Each row's keys and values live in its own slot from column 0 and each token attends to its
own row only, so a request's greedy tokens are the same alone or among others. Text is
detokenized incrementally and checked for stop strings on the new text only; streamed text holds
back what could still turn into a stop string.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparsefit.runtime.sampling import Sampling, next_token


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Event:
    """What one step did for a request: new text (and its tokens), and how it ended if it did."""

    request: int
    text: str
    tokens: list[int]
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length"


class Detokenizer:
    """Incremental decoding (as vLLM does it): the text of the newest tokens, decoded with a few
    earlier ones for context, and nothing while a multi-byte character is still incomplete."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


@dataclass
class _Row:
    request: int
    spec: Request
    generator: torch.Generator | None
    detok: Detokenizer
    prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    text: str = ""  # generated text so far (before any stop string)
    sent: int = 0  # characters of `text` already handed out

    @property
    def position(self) -> int:
        return len(self.spec.prompt_ids) + len(self.generated) - 1


@dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    steps: int = 0


class Engine:
    """Continuous batching of requests over a decoder (`runtime.decoder.Decoder` or the reference)."""

    def __init__(
        self, decoder: object, tokenizer: object, slots: int, capacity: int, eos: set[int], prefill_chunk: int = 512
    ) -> None:
        if slots < 1 or capacity < 2 or prefill_chunk < 1:
            raise ValueError("slots and prefill_chunk must be >= 1 and capacity >= 2")
        self.decoder, self.tokenizer, self.eos = decoder, tokenizer, set(eos)
        self.capacity, self.prefill_chunk = capacity, prefill_chunk
        self.cache = decoder.new_cache(slots, capacity)
        self.rows: list[_Row | None] = [None] * slots
        self.waiting: deque[tuple[int, Request]] = deque()
        self.stats = Stats()
        self._next_id = 0

    def submit(self, request: Request) -> int:
        """Queue a request; returns its id. A ValueError when it cannot fit the cache."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if n + request.max_new_tokens > self.capacity:
            raise ValueError(
                f"the prompt's {n} tokens plus {request.max_new_tokens} new ones exceed the context of "
                f"{self.capacity} tokens"
            )
        rid, self._next_id = self._next_id, self._next_id + 1
        self.waiting.append((rid, request))
        return rid

    def cancel(self, rid: int) -> None:
        """Drop a request, waiting or running (its slot frees at once)."""
        self.waiting = deque((i, r) for i, r in self.waiting if i != rid)
        for s, row in enumerate(self.rows):
            if row is not None and row.request == rid:
                self.rows[s] = None

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    def step(self) -> list[Event]:
        """One decoder call: admit waiting requests, prefill, decode one token per running row."""
        for s in range(len(self.rows)):
            if self.rows[s] is None and self.waiting:
                rid, req = self.waiting.popleft()
                self.rows[s] = _Row(rid, req, req.sampling.generator(), Detokenizer(self.tokenizer))
        tokens, rows, positions, last, owners = [], [], [], [], []
        budget, prefill = self.prefill_chunk, 0
        for s, row in enumerate(self.rows):
            if row is None:
                continue
            prompt = row.spec.prompt_ids
            if row.prefilled < len(prompt):  # (part of) the prompt
                take = min(budget, len(prompt) - row.prefilled)
                if take == 0:
                    continue
                tokens += prompt[row.prefilled : row.prefilled + take]
                positions += range(row.prefilled, row.prefilled + take)
                rows += [s] * take
                row.prefilled += take
                budget -= take
                prefill += take
                if row.prefilled == len(prompt):
                    last.append(len(tokens) - 1)
                    owners.append(s)
            else:  # the newest generated token
                tokens.append(row.generated[-1])
                positions.append(row.position)
                rows.append(s)
                last.append(len(tokens) - 1)
                owners.append(s)
        if not tokens:
            return []
        start = time.perf_counter()
        long = torch.long
        logits = self.decoder.forward(
            torch.tensor(tokens, dtype=long), torch.tensor(rows, dtype=long), torch.tensor(positions, dtype=long),
            self.cache, torch.tensor(last, dtype=long),
        )  # fmt: skip
        events = [self._advance(s, logits[j]) for j, s in enumerate(owners)]
        seconds = time.perf_counter() - start
        self.stats.steps += 1
        if prefill:
            self.stats.prefill_tokens += prefill
            self.stats.prefill_seconds += seconds
        else:
            self.stats.decode_tokens += len(owners)
            self.stats.decode_seconds += seconds
        return [e for e in events if e is not None]

    def _advance(self, slot: int, logits: torch.Tensor) -> Event | None:
        row = self.rows[slot]
        token = next_token(logits, row.spec.sampling, row.generator)
        row.generated.append(token)
        reason = None
        if token in self.eos and not row.spec.ignore_eos:
            reason = "stop"
        else:
            row.text += row.detok.add(token)
            cut = _first_stop(row.text, row.spec.stop, row.sent)
            if cut is not None:
                row.text, reason = row.text[:cut], "stop"
            elif len(row.generated) >= row.spec.max_new_tokens:
                reason = "length"
        # Hand out what no stop string can still claim (everything once the row ends).
        hold = 0 if reason else max((len(s) - 1 for s in row.spec.stop), default=0)
        upto = max(row.sent, len(row.text) - hold)
        event = Event(row.request, row.text[row.sent : upto], [token], reason)
        row.sent = upto
        if reason:
            self.rows[slot] = None
        return event


def _first_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the earliest stop string starts in `text`, looking only where it could be new: from
    just before the text already handed out."""
    found = None
    for stop in stops:
        at = text.find(stop, max(0, sent - len(stop) + 1))
        if at >= 0 and (found is None or at < found):
            found = at
    return found


def run_requests(
    engine: Engine, requests: list[Request], on_event: Callable[[Event], None] | None = None
) -> list[dict]:
    """Submit `requests`, step until all end; returns, in order, each one's text, tokens and finish reason."""
    ids = [engine.submit(r) for r in requests]
    out = {rid: {"text": "", "token_ids": [], "finish_reason": None} for rid in ids}
    while engine.busy:
        for e in engine.step():
            o = out[e.request]
            o["text"] += e.text
            o["token_ids"] += e.tokens
            if e.finish_reason:
                o["finish_reason"] = e.finish_reason
            if on_event is not None:
                on_event(e)
    return [out[rid] for rid in ids]
