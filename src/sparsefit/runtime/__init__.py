"""Running sparse models fast on the CPU: packed sparse kernels, `SparseLinear`, the decode loop."""

from sparsefit.runtime.kernels import load_kernels
from sparsefit.runtime.linear import SparseLinear
from sparsefit.runtime.model import GenerateResult, RuntimeModel, generate, load_runtime
from sparsefit.runtime.packing import PackedWeight, pack, unpack
from sparsefit.runtime.sampling import Sampling

__all__ = [
    "GenerateResult",
    "PackedWeight",
    "RuntimeModel",
    "Sampling",
    "SparseLinear",
    "generate",
    "load_kernels",
    "load_runtime",
    "pack",
    "unpack",
]
