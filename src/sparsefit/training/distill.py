"""Distillation losses, as pure tensor functions (student and teacher outputs in, scalar out).

- `kl_logits`: forward KL(teacher || student) of the softened distributions, times T^2
  (Hinton et al.), averaged over the valid token positions; value and gradient in one fused pass.
- `square_head`: SparseML's `square_head` comparison (Kurtic et al., "Sparse Fine-tuning for
  Inference Acceleration of LLMs"): per layer MSE(student, teacher) / mean(teacher^2), averaged
  over the chosen layers, so every layer weighs the same whatever its activation scale.
- `causal_lm_ce`: the task loss, next-token cross-entropy over labels != -100.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) aligned with the inputs -> (B, T) targets: position t predicts token t + 1 (-100 last).

    Shifting the labels, not the logits: slicing (B, T, V) logits would copy the largest tensor of the step.
    """
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def causal_lm_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) aligned with the inputs -> mean NLL of tokens 1..T-1 whose label != -100."""
    targets = next_token_targets(labels)
    if not (targets != -100).any():
        return logits.sum() * 0.0  # no supervised token in this batch: a zero that keeps the graph
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def kl_logits(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """student, teacher (..., V) logits; mask (...) of valid positions -> T^2 * mean KL(p_teacher || p_student).

    The value is the textbook formula; the gradient w.r.t. the student logits, T (p_student - p_teacher) / n,
    is computed in the same pass (see `_FusedKL`).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if mask is not None:
        student, teacher = student[mask.bool()], teacher[mask.bool()]
    student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    return _FusedKL.apply(student, teacher.detach(), float(temperature))


class _FusedKL(torch.autograd.Function):
    """KL and its gradient over row chunks of the (n, V) logits, in one pass.

    Autograd's version keeps both log-softmaxes and the elementwise KL, each n x V (over 100 MB for
    600 tokens of a 49k vocabulary), and walks them again in backward; chunks of rows stay in cache
    and only the gradient is kept, which saves both memory and time against the autograd composition.
    """

    CHUNK = 32  # rows

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:  # noqa: ANN001
        n = student.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty(student.shape, dtype=torch.float32, device=student.device) if want_grad else None
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for i in range(0, n, _FusedKL.CHUNK):
            rows = slice(i, i + _FusedKL.CHUNK)
            log_s = F.log_softmax(student[rows].float() / temperature, dim=-1)
            log_t = F.log_softmax(teacher[rows].float() / temperature, dim=-1)
            p_t = log_t.exp()
            # sum p_t (log_t - log_s) as two dot products: no chunk-sized temporaries
            flat = p_t.view(-1)
            total += torch.dot(flat, log_t.view(-1)).double() - torch.dot(flat, log_s.view(-1)).double()
            if want_grad:
                torch.sub(log_s.exp_(), p_t, out=grad[rows])  # d KL / d (student / T)
        ctx.save_for_backward(grad)
        ctx.scale, ctx.dtype = temperature / max(n, 1), student.dtype
        return (total * temperature**2 / max(n, 1)).float()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return (grad * (upstream * ctx.scale)).to(ctx.dtype), None, None


def square_head(
    student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Lists of (B, T, H) hidden states of the same layers -> mean over layers of MSE / mean(teacher^2).

    With a (B, T) mask, padded positions count in neither mean (the token counts cancel in the ratio).
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"square_head needs the same non-empty list of layers (got {len(student)} and {len(teacher)})")
    return torch.stack([_SquareHead.apply(s, t.detach(), mask) for s, t in zip(student, teacher)]).mean()


class _SquareHead(torch.autograd.Function):
    """sum(w (s - t)^2) / sum(w t^2) for one layer, its gradient 2 w (s - t) / sum(w t^2) made in the same pass.

    Autograd's version walks the (B, T, H) tensors about ten times per layer (sub, mul, pow, sum and their
    backward, for 30 layers per step); this one four times.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        teacher = teacher.float()
        diff = student.float() - teacher
        t_sq = torch.linalg.vector_norm(teacher, dim=-1).square()  # (B, T), no (B, T, H) temporary
        if mask is not None:
            w = mask.to(diff.dtype)
            diff.mul_(w.unsqueeze(-1))
            t_sq = t_sq * w
        denominator = t_sq.sum() + 1e-12
        flat = diff.view(-1)
        loss = torch.dot(flat, flat) / denominator
        ctx.save_for_backward(diff.mul_(2.0 / denominator) if ctx.needs_input_grad[0] else None)
        ctx.dtype = student.dtype
        return loss

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return (grad * upstream).to(ctx.dtype), None, None
