"""Distillation losses, as pure tensor functions (student and teacher outputs in, scalar out).

- `kl_logits`: forward KL(teacher || student) of the softened distributions, times T^2
  (Hinton et al.), averaged over the valid token positions.
- `square_head`: SparseML's `square_head` comparison (Kurtic et al., "Sparse Fine-tuning for
  Inference Acceleration of LLMs"): per layer MSE(student, teacher) / mean(teacher^2), averaged
  over the chosen layers, so every layer weighs the same whatever its activation scale.
- `causal_lm_ce`: the task loss, next-token cross-entropy over labels != -100.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) aligned with the inputs -> mean NLL of tokens 1..T-1 whose label != -100."""
    # Shift the labels, not the logits: slicing (B, T, V) logits would copy the largest tensor of the step.
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): position t predicts token t + 1
    if not (targets != -100).any():
        return logits.sum() * 0.0  # no supervised token in this batch: a zero that keeps the graph
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def kl_logits(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """student, teacher (B, T, V) logits; mask (B, T) of valid positions -> T^2 * mean_t KL(p_teacher || p_student)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (B, T)
    if mask is not None:
        per_token = per_token[mask.bool()]
    return per_token.mean() * temperature**2


def square_head(
    student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Lists of (B, T, H) hidden states of the same layers -> mean over layers of MSE / mean(teacher^2)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"square_head needs the same non-empty list of layers (got {len(student)} and {len(teacher)})")
    losses = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        if mask is None:
            losses.append(F.mse_loss(s, t) / (t.pow(2).mean() + 1e-12))
            continue
        w = mask.to(s.dtype).unsqueeze(-1)  # (B, T, 1): padded positions do not count (no gather copies)
        losses.append(((s - t).pow(2) * w).sum() / ((t.pow(2) * w).sum() + 1e-12))  # the counts cancel
    return torch.stack(losses).mean()
