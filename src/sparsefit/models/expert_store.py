"""Fused expert tensors in a file of their own, `experts.safetensors`, stored sparse.

transformers 5.x keeps a mixture of experts' weights as 3-D parameters (experts, out, in), which
neither the bitmask layouts (2-D weights) nor compressed-tensors' quantized formats (Linear modules)
describe, and which transformers' save renames by rules a compressed slice cannot pass. So the
sparse-bitmask exports and the quantized ones write these parameters here instead of in the main
weights: each expert's (out, in) slice in the `sparse-bitmask` layout of `models.bitmask`, as its
float values, or as quantized codes (int8, or float8) with their `weight_scale` (per output channel
or per group of input columns). Keys are `<parameter>.<expert>.<part>`; the metadata names the
format, every parameter's shape, and those stored (experts, in, out) (GPT-OSS), whose slices are
kept (out, in) all the same.

Every sparsefit loader restores them (`read_experts`), bit for bit; other loaders (transformers
alone, vLLM) find these parameters missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sparsefit.models.bitmask import PART_SUFFIXES, QUANT_SUFFIXES, check_parts, decompress_state_dict

EXPERTS_FILE = "experts.safetensors"
FORMAT = "sparsefit-experts"


def read_experts(folder: str | os.PathLike, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The fused parameters stored in `folder/experts.safetensors` (none when there is no such file),
    dense and float32 for quantized codes, by name. `expected`: the model's parameter shapes; a file
    naming a parameter the model lacks, or of another shape, is a ValueError naming the file, before
    any slice is decompressed."""
    from sparsefit.models.side_modules import read_safetensors

    path = Path(folder) / EXPERTS_FILE
    if not path.is_file():
        return {}
    meta, tensors = read_safetensors(path)
    try:
        shapes = {name: tuple(int(d) for d in shape) for name, shape in json.loads(meta["experts"]).items()}
        transposed = set(json.loads(meta.get("transposed", "[]")))
    except (KeyError, ValueError, TypeError, AttributeError):
        shapes = None
    if meta.get("format") != FORMAT or shapes is None:
        raise ValueError(f"{path} is not a sparsefit experts file (its metadata names no expert tensors)")
    out = {}
    for name, shape in shapes.items():
        if name not in expected:
            raise ValueError(f"{path} names a parameter the model lacks ({name})")
        if shape != tuple(expected[name]) or len(shape) != 3:
            raise ValueError(f"{path}: {name} is {shape}, but the model's config implies {tuple(expected[name])}")
        slices = []
        flip = name in transposed  # stored (experts, in, out); each slice is kept (out, in)
        matrix = shape[:0:-1] if flip else shape[1:]
        for e in range(shape[0]):
            prefix = f"{name}.{e}"
            parts = {
                f"{prefix}.{s}": tensors.pop(f"{prefix}.{s}")
                for s in (*PART_SUFFIXES, *QUANT_SUFFIXES)
                if f"{prefix}.{s}" in tensors
            }
            try:
                got = check_parts("sparse-bitmask", {k.removeprefix(f"{prefix}."): v for k, v in parts.items()})
                if got != matrix:
                    raise ValueError(f"is {got}, expected {matrix}")
                dense, _ = decompress_state_dict(parts, "sparse-bitmask")
            except ValueError as err:
                raise ValueError(f"{path}: expert {prefix}: {str(err).splitlines()[0]}") from None
            slices.append(dense[f"{prefix}.weight"].t() if flip else dense[f"{prefix}.weight"])
        out[name] = torch.stack(slices)
    if tensors:
        raise ValueError(f"{path}: tensor {next(iter(tensors))} belongs to no parameter its metadata names")
    return out
