"""Mask-preserving quantization: symmetric grids, GPTQ and round-to-nearest, through the pruning driver."""

from sparsefit.quantization.config import QuantizeConfig
from sparsefit.quantization.quantize import QuantizeReport, QuantizeResult, quantize

__all__ = ["QuantizeConfig", "QuantizeReport", "QuantizeResult", "quantize"]
