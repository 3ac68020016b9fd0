"""Export: plain HF checkpoints with sparsity metadata."""

from sparsefit.export.checkpoint import export_checkpoint, read_sparsity, save_checkpoint, sparsity_summary

__all__ = ["export_checkpoint", "read_sparsity", "save_checkpoint", "sparsity_summary"]
