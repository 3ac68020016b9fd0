"""Calibration sampler: N windows of L tokens cut from a tokenized dataset, deterministic for a seed."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

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


# Bumped whenever `tokenize_stream` changes what it returns for the same tokenizer and texts.
_STREAM_FORMAT = b"sparsefit token stream 1: texts joined by a blank line, no special tokens"
CACHED_STREAMS = 16  # the cache keeps the most recently used streams, a few MB per dataset each
STALE_WRITE_SECONDS = 3600


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """`tokenize_stream(tokenizer, texts)`, kept in `SPARSEFIT_CACHE/tokens` for the next call.

    Tokenizing a whole dataset (all of GSM8K train: 1.4M tokens) is a fixed cost of every prune,
    quantization and fine-tuning run that samples from it, the same each time. The entry
    is named by a hash of the tokenizer's full definition and of the texts, so any change to either
    misses. Tokenizers without a serialisable definition (slow, Python ones) are not cached; an
    unreadable or unwritable cache only costs the tokenization.
    """
    from sparsefit.atomic import write_bytes
    from sparsefit.cache import cache_root

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenize_stream(tokenizer, texts)
    digest = hashlib.sha256(_STREAM_FORMAT)
    digest.update(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}\n".encode())
    digest.update(backend.to_str().encode())
    for text in texts:
        digest.update(len(text).to_bytes(8, "little"))  # lengths too: ["ab", "c"] is not ["a", "bc"]
        digest.update(text.encode("utf-8", "surrogatepass"))
    folder = cache_root() / "tokens"
    path = folder / f"{digest.hexdigest()[:32]}.safetensors"
    try:
        stream = load_file(path)["ids"].long()
    except (OSError, SafetensorError, KeyError, RuntimeError):
        pass
    else:
        if stream.dim() != 1 or (stream.numel() and not 0 <= int(stream.min()) <= int(stream.max()) < len(tokenizer)):
            stream = tokenize_stream(tokenizer, texts)  # a damaged entry (ids beyond the vocabulary): made anew
            with contextlib.suppress(OSError):
                write_bytes(path, save({"ids": stream.to(torch.int32)}))
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: the last to be evicted
        return stream
    stream = tokenize_stream(tokenizer, texts)
    try:
        write_bytes(path, save({"ids": stream.to(torch.int32)}))
        _evict(folder, keep=CACHED_STREAMS)
    except OSError:
        pass
    return stream


def _evict(folder: Path, keep: int) -> None:
    """Delete all but the `keep` most recently used streams of `folder`, and the temporary files of
    writes killed long ago (a recent one may be another process's write in progress)."""
    from sparsefit.atomic import remove_old_temporaries

    remove_old_temporaries(folder, older_than=STALE_WRITE_SECONDS)
    entries = []
    for path in folder.glob("*.safetensors"):
        try:
            entries.append((path.stat().st_mtime, path))
        except FileNotFoundError:  # evicted by another process meanwhile
            pass
    for _, path in sorted(entries, reverse=True)[keep:]:
        path.unlink(missing_ok=True)


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
    return sample_windows(token_stream(tokenizer, texts), num_samples, seq_len, seed)
