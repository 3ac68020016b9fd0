"""Data-free calibration: sequences sampled from the dense model itself.

Temperature sampling from the BOS token gives text drawn from the model's own distribution,
so pruning (and distillation) need no dataset at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def sample_from_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """`num_samples` sequences of exactly `seq_len` tokens (BOS included) sampled from `model`: (N, L)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # One seed per batch keeps the result independent of how batches are scheduled.
    seeds = torch.randint(0, 2**31 - 1, (num_samples,), generator=gen).tolist()
    rows = []
    for b in tqdm(range(0, num_samples, batch_size), desc="self-generate", disable=not progress):
        n = min(batch_size, num_samples - b)
        ids = torch.full((n, 1), start, dtype=torch.long, device=device)
        # generate() samples from the global RNG; fork it so the caller's RNG state is untouched.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seeds[b])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                min_new_tokens=seq_len - 1,  # no early stop at EOS: every row has the full length
                max_new_tokens=seq_len - 1,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start,
            )
        rows.append(out.cpu())
    return torch.cat(rows)
