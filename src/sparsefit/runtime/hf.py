"""The yardstick: plain transformers `generate` on the dense model, as a user would run it
(`stop_strings` with the tokenizer, greedy or sampled), timed as prefill (to the first token)
and decode (the rest)."""

from __future__ import annotations

import time

import torch

from sparsefit.runtime.sampling import Sampling


class _Clock:
    """A streamer that only notes when the prompt and each new token arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def hf_generate(
    model: object,
    tokenizer: object,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
) -> dict:
    """One prompt through `model.generate`; its tokens, text and timings."""
    kwargs: dict = {"max_new_tokens": max_new_tokens, "do_sample": not sampling.greedy}
    if not sampling.greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    if ignore_eos:
        kwargs.update(eos_token_id=None, min_new_tokens=max_new_tokens)
    ids = torch.tensor([prompt_ids])
    clock = _Clock()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock,
                         pad_token_id=tokenizer.pad_token_id, **kwargs)  # fmt: skip
    end = time.perf_counter()
    tokens = out[0, len(prompt_ids) :].tolist()
    first = clock.times[1] if len(clock.times) > 1 else end  # times[0]: the prompt itself
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for s in stop:
        text = text.split(s)[0]
    return {
        "text": text,
        "token_ids": tokens,
        "prefill_seconds": first - start,
        "decode_seconds": end - first,
        "decode_tokens": max(len(tokens) - 1, 0),
    }
