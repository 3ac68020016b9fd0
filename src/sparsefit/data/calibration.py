"""Calibration sampler: N windows of L tokens cut from a tokenized dataset, deterministic for a seed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparsefit.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str], chunk: int = 512) -> torch.Tensor:
    """Tokenize texts and concatenate them into one 1-D stream, a blank line between texts.

    A blank line, not EOS, separates texts: the papers join WikiText rows the same way, and an
    instruct model's EOS (e.g. `<|im_end|>`) mid-stream is far from what the model saw in training.
    Chunked, so at most `chunk` texts live as Python int lists at once.
    """
    parts = []
    for start in range(0, len(texts), chunk):
        batch = [t + "\n\n" if start + i < len(texts) - 1 else t for i, t in enumerate(texts[start : start + chunk])]
        for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            parts.append(torch.tensor(row, dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def sample_windows(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at random offsets of `stream`: shape (N, L)."""
    if num_samples < 1 or seq_len < 2:
        raise UsageError(f"need num_samples >= 1 and seq_len >= 2 (got {num_samples}, {seq_len})")
    if stream.numel() < seq_len:
        raise UsageError(
            f"dataset too short: {stream.numel()} tokens, but one calibration sequence needs {seq_len}; "
            "lower --seq-len or use a larger dataset"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def sample_calibration(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], num_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """Tokenize `texts`, concatenate (blank lines between) and cut `num_samples` windows of `seq_len` tokens (N, L)."""
    return sample_windows(tokenize_stream(tokenizer, texts), num_samples, seq_len, seed)
