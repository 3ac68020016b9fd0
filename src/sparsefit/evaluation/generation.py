"""Greedy batched generation with a KV cache: left padding, stop strings, a new-token bound."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def truncate_at_stops(text: str, stops: list[str]) -> str:
    """Cut a generation at the first occurrence of each stop string (as the harness does)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


class StopOnStrings(StoppingCriteria):
    """Per-row stop once any stop string appears in the last few generated tokens (as the harness does)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stops: list[str], prompt_len: int, lookback: int = 10
    ) -> None:
        self.tokenizer, self.stops, self.prompt_len, self.lookback = tokenizer, stops, prompt_len, lookback

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.lookback)
        tails = self.tokenizer.batch_decode(input_ids[:, start:])
        return torch.tensor([any(s in t for s in self.stops) for t in tails], device=input_ids.device)


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    stops: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[str], dict]:
    """Greedy continuations of `prompts`, in the input order, and throughput statistics.

    Prompts are sorted by length so batches carry little padding; padding is on the left so
    every row's next token sits in the last position.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    new_tokens = 0
    start = time.perf_counter()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos = [t for t in {tokenizer.eos_token_id, model.generation_config.eos_token_id} if isinstance(t, int)]
    try:
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                stopping_criteria=StoppingCriteriaList(
                    [StopOnStrings(tokenizer, [s for s in stops if s], enc["input_ids"].shape[1])]
                ),
                eos_token_id=eos or None,
                pad_token_id=tokenizer.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            gen = out[:, enc["input_ids"].shape[1] :]
            for row, i in zip(gen, idx):
                new_tokens += int((row != tokenizer.pad_token_id).sum())  # padding after a row's end
                outputs[i] = truncate_at_stops(tokenizer.decode(row, skip_special_tokens=True), stops)
            bar.update(len(idx))
        bar.close()
    finally:
        tokenizer.padding_side = padding_side
    seconds = time.perf_counter() - start
    return outputs, {"generated_tokens": new_tokens, "seconds": seconds, "tokens_per_second": new_tokens / seconds}
