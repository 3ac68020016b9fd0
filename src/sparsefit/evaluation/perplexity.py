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
# apply lm_head in chunks to scored positions only, never holding (batch, seq, vocab) float32 logits.
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
def nll_sum(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk: int = 1024,
) -> tuple[torch.Tensor, int]:
    """Sum (float32) and count of next-token NLLs over positions whose label is not -100.

    input_ids, labels: (B, T), labels aligned with input_ids (the shift happens here); no
    labels means every next token counts.
    """
    targets = (input_ids if labels is None else labels)[:, 1:]
    keep = targets != -100  # (B, T-1)
    targets = targets[keep]  # (n,)
    if model.config.model_type in _CHUNKED_HEAD_TYPES:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state[:, :-1][keep]  # (n, H): only positions that are scored
        head = model.get_output_embeddings()
        total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = head(hidden[s : s + chunk]).float()  # (c, V)
            total += F.cross_entropy(logits, targets[s : s + chunk], reduction="sum")
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        total = F.cross_entropy(logits[:, :-1][keep].float(), targets, reduction="sum")
    return total, int(targets.numel())


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
    total = 0.0
    was_training = model.training
    model.eval()
    bar = tqdm(total=windows.shape[0], desc="perplexity", unit="win", disable=not progress)
    for b in range(0, windows.shape[0], batch_size):
        batch = windows[b : b + batch_size].to(device)
        total += nll_sum(model, batch)[0].item()
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(total / ((b + batch.shape[0]) * (seq_len - 1))):.3f}")
    bar.close()
    model.train(was_training)
    tokens = windows.shape[0] * (seq_len - 1)
    nll = total / tokens
    if not math.isfinite(nll):
        raise SparsefitError("perplexity is not finite: the model produced NaN or inf logits; check the checkpoint")
    return PerplexityResult(math.exp(nll), nll, tokens, windows.shape[0], seq_len, time.perf_counter() - start)
