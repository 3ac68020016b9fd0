"""What one fine-tuning run holds while it trains: set up once (`prepare.prepare_run`), then read
and updated by the loop, the mask steps, the checkpoints and the final save."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from sparsefit.training.adapters.finetune import Adapters
    from sparsefit.training.adaptive import AdaptiveMasks
    from sparsefit.training.distributed import DistInfo
    from sparsefit.training.losses import HeadPath
    from sparsefit.training.masks import SparsityMasks


@dataclass
class Run:
    """What the loop needs, set up once."""

    info: DistInfo
    device: torch.device
    bf16: bool
    fsdp: bool
    masks: SparsityMasks | None
    teacher: PreTrainedModel | None
    examples: list
    lengths: list[int]
    steps: int
    layers: list[int]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_model: torch.nn.Module
    student_path: HeadPath
    teacher_path: HeadPath | None
    pad_id: int
    adaptive: AdaptiveMasks | None = None
    adapters: Adapters | None = None
    skeleton: torch.nn.Module | None = None  # FSDP with adapters: the model's structure, to merge on rank 0
    fingerprint: dict = field(default_factory=dict)
    checkpoint_seconds: float = 0.0
    checkpoints: int = 0
