"""The sparse CPU kernels (`runtime/csrc`) as torch operators: built once, then loaded.

`torch.utils.cpp_extension` compiles the C++ sources into `SPARSEFIT_CACHE/kernels/<key>`, where the
key covers the sources, torch's version and the compiler, so a changed source or a new torch builds
afresh and an unchanged one loads in milliseconds. The set-up command builds them
(`python -m sparsefit.runtime.kernels`); otherwise the first use does. The operators:

- `torch.ops.sparsefit.linear(x, masks, values, block_offsets, scales, bias, rows, cols, row_block, isa)`
  (`packed.h` describes the layout), with a fake kernel so `torch.compile` and `torch.export` trace it;
- `torch.ops.sparsefit.best_isa()` / `isa_supported(name)`: the dispatch table's view of this CPU.

Without a compiler, or on a CPU with neither AVX2 nor AVX-512, `load_kernels()` says why in one line and
callers take the dense torch path. `load_kernels()` builds and loads them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = (
    "ops.cpp",
    "dispatch.cpp",
    "llama.cpp",
    "bf16_avx512.cpp",
    "int8_avx512.cpp",
    "bf16_avx512bf16.cpp",
    "int8_avx512bf16.cpp",
    "bf16_amx.cpp",
    "int8_amx.cpp",
    "bf16_avx2.cpp",
    "int8_avx2.cpp",
)
HEADERS = ("packed.h", "prefetch.h", "dispatch.h", "avx512.h", "bf16_dot.h", "avx2.h", "amx.h", "int8_codes.h")
ISAS = ("avx512bf16", "avx512", "amx", "avx2")  # the dispatch table's rows, best first (ops.cpp)
# The rows whose kernels round the inputs to bf16 for a value type (AMX and vdpbf16ps multiply bf16
# by bf16); the others take fp32 inputs as they are.
ROUNDS_INPUTS = {("amx", "bfloat16"), ("amx", "int8"), ("avx512bf16", "bfloat16"), ("avx512bf16", "int8")}
ISA_ENV = "SPARSEFIT_KERNEL_ISA"  # auto (default) | avx512 | avx512bf16 | amx | avx2: force a row


@dataclass(frozen=True)
class Kernels:
    """What this process can run: `isa` is the best instruction set of the dispatch table the CPU
    supports ("none" when the kernels are unavailable, and then `reason` says why)."""

    available: bool
    isa: str
    reason: str = ""

    def supports(self, isa: str) -> bool:
        return self.available and bool(torch.ops.sparsefit.isa_supported(isa))


def _build_key() -> str:
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    h.update(f"{torch.__version__}|{platform.machine()}|{shutil.which('c++') or shutil.which('g++')}".encode())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    from sparsefit.cache import cache_root

    return cache_root() / "kernels" / _build_key()


# -ffp-contract=off: FMAs only where the sources write them (sums in one order, whatever the
# batch). -fopenmp: at::parallel_for is an OpenMP pragma inside ATen's headers; without the flag it
# compiles to a serial loop. The GOMP symbols resolve to the OpenMP runtime torch already loaded.
CFLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]


@functools.cache
def load_kernels(verbose: bool = False) -> Kernels:
    """Build (when needed) and load the operators, once per process."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return _unavailable(f"the sparse kernels are for x86-64 CPUs, this is {platform.machine()}")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return _unavailable("no C++ compiler (c++ / g++) on PATH to build the sparse kernels")
    from torch.utils.cpp_extension import load

    folder = build_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        load(
            name="sparsefit_kernels",
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=CFLAGS,
            build_directory=str(folder),
            is_python_module=False,
            verbose=verbose,
        )
    except (OSError, RuntimeError, ImportError) as err:
        last = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        return _unavailable(f"the sparse kernels did not build in {folder} ({last})")
    isa = str(torch.ops.sparsefit.best_isa())
    if isa == "none":
        return _unavailable("this CPU has neither AVX-512 (F, BW, VL, VBMI, VBMI2) nor AVX2 with FMA")
    _register_fake()
    return Kernels(True, isa)


def _unavailable(reason: str) -> Kernels:
    print(f"warning: {reason}; sparse layers run on the dense torch path", file=sys.stderr, flush=True)
    return Kernels(False, "none", reason)


def _register_fake() -> None:
    @torch.library.register_fake("sparsefit::linear")
    def _(x, masks, values, block_offsets, scales, bias, rows, cols, row_block, isa):  # noqa: ANN001, ANN202
        return x.new_empty((*x.shape[:-1], rows))


def input_dtype(isa: str, values: str) -> torch.dtype:
    """The precision the kernels of `isa` take the inputs of `values` weights in."""
    return torch.bfloat16 if (isa, values) in ROUNDS_INPUTS else torch.float32


def choose_isa(requested: str | None = None) -> str:
    """The instruction set to run: `requested`, else $SPARSEFIT_KERNEL_ISA, else the best one here.
    A ValueError when the kernels are unavailable or the CPU lacks the one asked for."""
    k = load_kernels()
    name = requested or os.environ.get(ISA_ENV, "auto") or "auto"
    if not k.available:
        raise ValueError(k.reason)
    if name == "auto":
        return k.isa
    if name not in ISAS:
        raise ValueError(f"unknown kernel instruction set '{name}'; use one of: auto, {', '.join(ISAS)}")
    if not k.supports(name):
        raise ValueError(f"this CPU cannot run the {name} kernels (best here: {k.isa})")
    return name
