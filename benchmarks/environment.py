"""What every benchmark JSON records about the run: commit, date, library versions, CPU, device."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Variables that keep torch, oneDNN and MKL below the CPU's best instructions: set to AVX2 on an
# AVX-512 machine, they stand in for a CPU without AVX-512 (and without native bf16).
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def _cpu() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {
        "model": model,
        "cores": os.cpu_count(),
        "avx512": "avx512f" in flags,
        "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "amx": "amx_bf16" in flags,  # bf16 matrix units (Intel AMX)
        # the vector and matrix extensions the kernels may pick from
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
    }


def environment(device: str = "cpu") -> dict:
    import torch

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # A copy of the tree whose .git is absent or stale (a lent GPU machine) names its commit here.
    commit = os.environ.get("SPARSEFIT_COMMIT") or (
        git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "src") else "")
    )
    versions = {}
    for name in ("sparsefit", "torch", "transformers", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "versions": versions,
        "cpu": _cpu(),
        # What torch's kernels use (AVX2 on an AVX-512 CPU when limited), and any limits set.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if k in os.environ},
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
    }
