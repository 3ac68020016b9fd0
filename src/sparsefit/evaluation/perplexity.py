"""Perplexity as the pruning papers measure it (SparseGPT / Wanda `eval_ppl`).

Non-overlapping windows of `seq_len` tokens over one token stream; every window predicts
its last `seq_len - 1` tokens; perplexity is exp of the mean NLL over all predicted tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsefit.errors import SparsefitError, UsageError
from sparsefit.models.loading import context_length

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Families whose logits are exactly lm_head(base_model(...).last_hidden_state): for these we
# apply lm_head in chunks and never hold a (batch, seq, vocab) float32 logits tensor.
_CHUNKED_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "opt", "phi3"}


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_seq_len(model: PreTrainedModel, seq_len: int) -> None:
    limit = context_length(model.config)
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 (got {seq_len})")
    if limit is not None and seq_len > limit:
        raise UsageError(
            f"--seq-len {seq_len} is larger than the model's context ({limit}); use --seq-len {limit} or less"
        )


def stream_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into non-overlapping windows (W, seq_len); the tail is dropped."""
    count = stream.numel() // seq_len
    if count == 0:
        raise UsageError(
            f"dataset too short: {stream.numel()} tokens, fewer than one window of {seq_len}; lower --seq-len"
        )
    if max_windows is not None:
        if max_windows < 1:
            raise UsageError(f"--max-windows must be at least 1 (got {max_windows})")
        count = min(count, max_windows)
    return stream[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def window_nll_sum(model: PreTrainedModel, input_ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Sum over windows of the token NLLs of next-token prediction, in float32. input_ids: (B, T)."""
    labels = input_ids[:, 1:]
    if model.config.model_type not in _CHUNKED_HEAD_TYPES:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
    head = model.get_output_embeddings()
    total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
    for s in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, s : s + chunk]).float()  # (B, c, V)
        total += F.cross_entropy(logits.flatten(0, 1), labels[:, s : s + chunk].flatten(), reduction="sum")
    return total


def perplexity(
    model: PreTrainedModel,
    stream: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` over a 1-D token stream, in non-overlapping windows of `seq_len`."""
    check_seq_len(model, seq_len)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    windows = stream_windows(stream, seq_len, max_windows)
    device = next(model.parameters()).device
    start = time.perf_counter()
    nll_sum = 0.0
    was_training = model.training
    model.eval()
    bar = tqdm(total=windows.shape[0], desc="perplexity", unit="win", disable=not progress)
    for b in range(0, windows.shape[0], batch_size):
        batch = windows[b : b + batch_size].to(device)
        nll_sum += window_nll_sum(model, batch).item()
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(nll_sum / ((b + batch.shape[0]) * (seq_len - 1))):.3f}")
    bar.close()
    model.train(was_training)
    tokens = windows.shape[0] * (seq_len - 1)
    nll = nll_sum / tokens
    if not math.isfinite(nll):
        raise SparsefitError("perplexity is not finite: the model produced NaN or inf logits; check the checkpoint")
    return PerplexityResult(math.exp(nll), nll, tokens, windows.shape[0], seq_len, time.perf_counter() - start)
