"""The dense teacher of a distillation run: loaded frozen, checked against the student's vocabulary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparsefit.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sparsefit.training.config import FinetuneConfig


def load_teacher(
    spec: str, dtype: torch.dtype, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from sparsefit.models import load_model_and_tokenizer

    teacher, tokenizer = load_model_and_tokenizer(spec, dtype, device)
    freeze(teacher)
    return teacher, tokenizer


def prepare_teacher(
    config: FinetuneConfig, teacher: PreTrainedModel | None, device: torch.device, bf16: bool
) -> tuple[PreTrainedModel | None, PreTrainedTokenizerBase | None]:
    """The run's teacher, frozen on `device`: `teacher` when given, else `config.teacher` loaded when the
    run distills (in bfloat16 when teacher_dtype says so, or by default with bf16 training); its
    tokenizer when loaded here."""
    teacher_tok = None
    if config.distilling and teacher is None:
        use_bf16 = config.teacher_dtype == "bfloat16" or (config.teacher_dtype == "auto" and bf16)
        teacher, teacher_tok = load_teacher(config.teacher, torch.bfloat16 if use_bf16 else torch.float32, device)
    if teacher is not None:
        freeze(teacher)
        teacher.to(device)
    return teacher, teacher_tok


def freeze(teacher: torch.nn.Module) -> None:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


def check_compatible(
    student: PreTrainedModel,
    student_tok: PreTrainedTokenizerBase,
    teacher: PreTrainedModel,
    teacher_tok: PreTrainedTokenizerBase | None,
    distill_layers: list[int] | None,
    num_blocks: int,
    square_head: bool = False,
) -> None:
    """Logit distillation compares distributions token by token: both models must share one vocabulary."""
    s_vocab = student.get_output_embeddings().weight.shape[0]
    t_vocab = teacher.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise UsageError(
            f"teacher vocabulary ({t_vocab}) differs from the student's ({s_vocab}); "
            "distill from a model of the same family"
        )
    if teacher_tok is not None and teacher_tok.get_vocab() != student_tok.get_vocab():
        raise UsageError("teacher and student tokenizers differ; distill from a model with the student's tokenizer")
    for i in distill_layers or []:
        if not 0 <= i < num_blocks:
            raise UsageError(f"distill layer {i} does not exist: the student has blocks 0..{num_blocks - 1}")
    if not square_head:
        return
    t_hidden = getattr(teacher.config, "hidden_size", None)
    s_hidden = getattr(student.config, "hidden_size", None)
    if t_hidden != s_hidden:
        raise UsageError(f"square_head compares hidden states: teacher width {t_hidden} != student width {s_hidden}")
