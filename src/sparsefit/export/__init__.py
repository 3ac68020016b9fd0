"""Export: plain HF checkpoints with sparsity metadata."""

from sparsefit.export.checkpoint import read_sparsity, save_checkpoint, sparsity_summary

__all__ = ["read_sparsity", "save_checkpoint", "sparsity_summary"]
