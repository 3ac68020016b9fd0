"""The loss of one micro-batch: task CE, logit KL and square-head, evaluated where they count.

CE and KL are taken only at supervised positions (answer tokens; every token of packed text).
Where the model's logits are exactly `lm_head(last hidden state)` (checked numerically once,
see `HeadPath.detect`), the head runs on those positions only: the vocabulary projection is
the largest tensor of a step, and prompt and padding positions never need it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsefit.training import distill
from sparsefit.training.config import FinetuneConfig
from sparsefit.training.sharding import is_sharded


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


@dataclass(frozen=True)
class HeadPath:
    """Whether logits may be computed as head(final hidden state) at chosen positions only.

    An unwrapped model runs its backbone (`base_model`) and the head on the chosen positions; a
    DDP-wrapped one must run its own forward (its gradient hooks hang on it), with `logits_to_keep=1`
    so the head covers one position. The backbone route also avoids a slow CPU path of that one
    position: a bfloat16 (B, 1, H) x (H, V) product copies the whole head weight once per row.
    """

    enabled: bool

    @classmethod
    @torch.no_grad()
    def detect(cls, model: nn.Module, batch: dict[str, torch.Tensor]) -> HeadPath:
        model = _unwrap(model)
        head = model.get_output_embeddings()
        if head is None or is_sharded(model) or model.base_model is model:
            return cls(False)  # FSDP gathers the head's weight only inside the model's forward
        ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
        try:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            short = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
            base = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        except TypeError:  # a model without logits_to_keep
            return cls(False)
        logits = out.logits.float()
        same = all(
            logits.shape == ours.shape and torch.allclose(logits, ours, rtol=1e-4, atol=1e-4)
            for ours in (head(out.hidden_states[-1]).float(), head(base.last_hidden_state).float())
        )
        return cls(bool(same and short.logits.shape[1] == 1))

    def forward(
        self, model: nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor, hidden: bool
    ) -> tuple[torch.Tensor, tuple | None]:
        """Logits (n, V) at `positions` (B, T bool) and, if asked, the hidden states of every block."""
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        if not self.enabled:
            out = model(**kwargs, output_hidden_states=hidden)
            return out.logits[positions], out.hidden_states
        inner = _unwrap(model)
        head = inner.get_output_embeddings()
        if inner is model:
            out = model.base_model(**kwargs, output_hidden_states=hidden)
            return head(out.last_hidden_state[positions]), out.hidden_states if hidden else None
        out = model(**kwargs, output_hidden_states=True, logits_to_keep=1)
        return head(out.hidden_states[-1][positions]), out.hidden_states if hidden else None


def task_loss(model: nn.Module, batch: dict[str, torch.Tensor], path: HeadPath) -> torch.Tensor:
    """Next-token cross-entropy at the supervised positions, the head evaluated there only."""
    targets = distill.next_token_targets(batch["labels"])
    positions = targets != -100
    logits, _ = path.forward(model, batch, positions, False)
    if not positions.any():
        return logits.sum() * 0.0  # no supervised token: a zero that keeps the graph
    return F.cross_entropy(logits.float(), targets[positions])


def compute_losses(
    model: nn.Module,
    teacher: nn.Module | None,
    batch: dict[str, torch.Tensor],
    config: FinetuneConfig,
    layers: list[int],
    student_path: HeadPath,
    teacher_path: HeadPath | None,
) -> dict[str, torch.Tensor]:
    """Weighted sum of the task CE, logit KL and square-head losses for one micro-batch (plus each term)."""
    targets = distill.next_token_targets(batch["labels"])
    positions = targets != -100
    want_hidden = teacher is not None and config.square_head_weight > 0
    logits, hidden = student_path.forward(model, batch, positions, want_hidden)  # (n, V)
    zero = logits.new_zeros((), dtype=torch.float32)
    ce = kl = sq = zero
    if config.ce_weight > 0 and positions.any():
        ce = F.cross_entropy(logits.float(), targets[positions])
    if teacher is not None and (config.kl_weight > 0 or want_hidden):
        # no_grad, not inference_mode: its outputs enter the losses as constants without a copy
        with torch.no_grad():
            t_logits, t_hidden = teacher_path.forward(teacher, batch, positions, want_hidden)
        t_hidden = [t_hidden[i + 1] for i in layers] if want_hidden else None
        if config.kl_weight > 0 and positions.any():
            kl = distill.kl_logits(logits, t_logits, None, config.temperature)
        if want_hidden:
            # hidden_states[i + 1] is the output of block i (the last one after the final norm)
            sq = distill.square_head([hidden[i + 1] for i in layers], t_hidden, batch["attention_mask"])
    loss = config.ce_weight * ce + config.kl_weight * kl + config.square_head_weight * sq
    return {"loss": loss, "ce": ce, "kl": kl, "square_head": sq}
