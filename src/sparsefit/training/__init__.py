"""Sparse fine-tuning: mask-preserving training, distillation, gradual and iterative pruning."""

from sparsefit.training.config import FinetuneConfig, GMPConfig
from sparsefit.training.iterative import iterative_prune_finetune
from sparsefit.training.loop import finetune
from sparsefit.training.masks import SparsityMasks

__all__ = ["FinetuneConfig", "GMPConfig", "SparsityMasks", "finetune", "iterative_prune_finetune"]
