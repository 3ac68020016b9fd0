"""Datasets by name or path, and the calibration sampler."""

from sparsefit.data.calibration import sample_calibration, sample_windows, token_stream, tokenize_stream
from sparsefit.data.sources import NAMED, format_gsm8k, load_rows, load_texts

__all__ = [
    "NAMED",
    "format_gsm8k",
    "load_rows",
    "load_texts",
    "sample_calibration",
    "sample_windows",
    "token_stream",
    "tokenize_stream",
]
