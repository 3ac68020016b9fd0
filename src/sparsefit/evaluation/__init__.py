"""Evaluation: perplexity (more tasks in later modules)."""

from sparsefit.evaluation.perplexity import PerplexityResult, perplexity, stream_windows

__all__ = ["PerplexityResult", "perplexity", "stream_windows"]
