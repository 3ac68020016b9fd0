"""Compact sparse storage: the bitmask layouts of compressed-tensors up to 0.14, and their reader.

compressed-tensors 0.15 removed them and transformers no longer loads such checkpoints, so
sparsefit keeps its own reader (here, below every loader) and writer (`export.bitmask`). The layouts,
per weight `W.` of shape (rows, cols):

- `sparse-bitmask`: `W.compressed` the nonzero values in row-major order (1-D), `W.bitmask` uint8
  (rows, ceil(cols / 8)), bit j of byte k flagging column 8k + j (little-endian bit order),
  `W.row_offsets` int64 (rows,) the index in `compressed` where each row starts, `W.shape` int64 (2,);
- `sparse-24-bitmask`: `W.compressed` (rows, cols / 2), the two kept values of every group of four
  columns, `W.bitmask` as above over the full width, `W.shape` int64 (2, 1).

With quantization (0.14 stored the sparse layout of the quantized weight): `compressed` holds int8
or float8 codes and `W.weight_scale` sits beside it; the weight is codes x scale per output channel.
Round trips are bit-exact, except that -0.0 is stored as +0.0 (a zero has no sign worth keeping).
"""

from __future__ import annotations

import torch

from sparsefit.models.finite import bad_values

FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
_BITS = 1 << torch.arange(8, dtype=torch.int32)
_PARTS_24 = ("compressed", "bitmask", "shape")
# Tensors of a compressed weight besides its values; a quantized one also carries these.
PART_SUFFIXES = ("compressed", "bitmask", "row_offsets", "shape")
QUANT_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_global_scale", "input_scale", "input_zero_point")


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool -> (rows, ceil(cols / 8)) uint8, little-endian bit order within each byte."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.int32), (0, -cols % 8))
    return (padded.reshape(rows, -1, 8) * _BITS).sum(-1).to(torch.uint8)


def unpack_bitmask(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of `pack_bitmask`: (rows, ceil(cols / 8)) uint8 -> (rows, cols) bool."""
    rows, cols = shape
    if packed.shape != (rows, -(-cols // 8)):
        raise ValueError(f"bitmask of shape {tuple(packed.shape)} does not fit a weight of shape {(rows, cols)}")
    bits = (packed.to(torch.int32).unsqueeze(-1) & _BITS) != 0
    return bits.reshape(rows, -1)[:, :cols]


_MAX_DIM = 1 << 31  # a weight dimension beyond this is no model's
_INDEX_DTYPES = (torch.int64, torch.int32)


def _described(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"


def check_parts(fmt: str, parts: dict[str, torch.Tensor]) -> tuple[int, int]:
    """The (rows, cols) of a compressed weight once its parts agree with each other, checked on their
    shapes and dtypes alone (nothing is allocated): the size the `shape` tensor claims must be the
    size the stored bitmask covers, so a small file cannot make the reader allocate a large one."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown sparse format '{fmt}'; sparsefit reads {', '.join(FORMATS)}")
    needed = ("compressed", "bitmask", "shape", "row_offsets") if fmt == "sparse-bitmask" else _PARTS_24
    missing = [s for s in needed if s not in parts]
    if missing:
        raise ValueError(f"lacks its {', '.join(missing)} tensor{'s' * (len(missing) > 1)} ({fmt})")
    shape = parts["shape"]
    if shape.dtype not in _INDEX_DTYPES or shape.numel() != 2:
        raise ValueError(f"shape must hold 2 integers (rows, cols), got {_described(shape)}")
    rows, cols = (int(d) for d in shape.flatten().tolist())
    if not (0 < rows <= _MAX_DIM and 0 < cols <= _MAX_DIM):
        raise ValueError(f"shape ({rows}, {cols}) is out of range (each dimension 1 to {_MAX_DIM})")
    bitmask = parts["bitmask"]
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise ValueError(
            f"bitmask is {_described(bitmask)}; a weight of shape ({rows}, {cols}) needs uint8 {(rows, -(-cols // 8))}"
        )
    values = parts["compressed"]
    if not (values.is_floating_point() or values.dtype == torch.int8):
        raise ValueError(f"compressed holds {_described(values)}; expected float values or int8 / float8 codes")
    if fmt == "sparse-24-bitmask":
        if cols % 4 or tuple(values.shape) != (rows, cols // 2):
            raise ValueError(
                f"compressed is {_described(values)}; a 2:4 weight of shape ({rows}, {cols}) stores ({rows}, "
                f"{cols // 2}) and has a multiple of 4 columns"
            )
    else:
        offsets = parts["row_offsets"]
        if values.dim() != 1 or values.numel() > rows * cols:
            raise ValueError(f"compressed is {_described(values)}; expected 1-D, at most {rows * cols} values")
        if offsets.dtype not in _INDEX_DTYPES or tuple(offsets.shape) != (rows,):
            raise ValueError(f"row_offsets is {_described(offsets)}; expected int64 ({rows},)")
    return rows, cols


def decompress(fmt: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight from its parts in format `fmt` (one of FORMATS), validated first (`check_parts`),
    then the bitmask against the values and row offsets."""
    shape = check_parts(fmt, parts)
    mask = unpack_bitmask(parts["bitmask"], shape)
    values = parts["compressed"].flatten()
    counts = mask.sum(-1)
    if values.numel() != int(counts.sum()):
        raise ValueError(f"{values.numel()} stored values but the bitmask flags {int(counts.sum())}")
    if fmt == "sparse-24-bitmask":
        if not bool((mask.reshape(shape[0], -1, 4).sum(-1) == 2).all()):
            raise ValueError("the bitmask does not flag exactly 2 of every 4 columns (sparse-24-bitmask)")
    elif not torch.equal(parts["row_offsets"].to(torch.int64), torch.cumsum(counts, 0) - counts):
        raise ValueError("row_offsets do not match the bitmask's count of values in each row")
    if values.dtype == torch.float8_e4m3fn:  # indexing assignment needs a plain dtype: move raw bytes
        dense = torch.zeros(shape, dtype=torch.uint8)
        dense[mask] = values.view(torch.uint8)
        return dense.view(torch.float8_e4m3fn)
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def sparse_format(config: dict) -> str | None:
    """The bitmask format a checkpoint's config.json declares (None: not a sparse-compressed checkpoint).

    Older checkpoints put the block under `compression_config`. The format string is only ever
    compared with FORMATS, never used to look anything up.
    """
    block = config.get("quantization_config") or config.get("compression_config") or {}
    sparsity = block.get("sparsity_config") if isinstance(block, dict) else None
    fmt = sparsity.get("format") if isinstance(sparsity, dict) else None
    if fmt in (None, "dense"):
        return None
    if fmt not in FORMATS:
        raise ValueError(f"sparse format '{fmt}' is not one sparsefit reads ({', '.join(FORMATS)})")
    return fmt


def decompress_state_dict(state: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state` with every bitmask-compressed weight dense again (quantized codes times their scales).

    Returns the state and notes on what was dropped (activation scales: the model runs unquantized).
    """
    out, notes = dict(state), []
    for prefix in sorted(k.removesuffix(".bitmask") for k in state if k.endswith(".bitmask")):
        parts = {s: out.pop(f"{prefix}.{s}") for s in PART_SUFFIXES if f"{prefix}.{s}" in out}
        try:
            weight = decompress(fmt, parts)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{prefix}: {err}") from None
        quant = {s: out.pop(f"{prefix}.{s}") for s in QUANT_SUFFIXES if f"{prefix}.{s}" in out}
        for suffix, t in {"compressed": parts["compressed"], **quant}.items():
            n = bad_values(t)
            if n:  # a NaN scale dequantizes its whole row to NaN
                raise ValueError(f"{prefix}.{suffix} holds {n} NaN or infinite values")
        codes = not weight.is_floating_point() or weight.dtype == torch.float8_e4m3fn
        for suffix in ("weight_scale", "weight_zero_point"):
            if suffix in quant:
                _check_groups(f"{prefix}.{suffix}", quant[suffix], weight.shape)
        if quant and not codes:
            notes.append(f"{prefix}: quantization parameters beside float values ignored (already dequantized)")
        elif "weight_scale" in quant:
            weight = _dequantize(weight, quant["weight_scale"], quant.get("weight_zero_point"))
            n = bad_values(weight)
            if n:  # finite codes times a finite but huge scale
                raise ValueError(f"{prefix}.weight_scale times its codes overflows float32 in {n} weights")
            if "input_scale" in quant:
                notes.append(f"{prefix}: static activation scales dropped (the model computes unquantized)")
        elif codes:
            raise ValueError(f"{prefix}: {weight.dtype} values without a weight_scale cannot be dequantized")
        out[f"{prefix}.weight"] = weight
    return out, notes


def _check_groups(name: str, t: torch.Tensor, shape: tuple[int, int]) -> None:
    """A per-channel or per-group parameter of a (rows, cols) weight: rows x groups values, the groups
    dividing the columns."""
    rows, cols = shape
    groups = t.numel() // rows if rows else 0
    if (
        t.numel() != rows * groups
        or groups < 1
        or cols % groups
        or not (t.is_floating_point() or t.dtype in (torch.int8, *_INDEX_DTYPES))
    ):
        raise ValueError(
            f"{name} is {_described(t)}; a weight of shape ({rows}, {cols}) needs ({rows}, groups) values, "
            "the groups dividing its columns"
        )


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    rows, cols = codes.shape
    scale = scale.float().reshape(rows, -1)
    values = codes.float()
    if zero_point is not None:
        values = values - zero_point.float().reshape(rows, -1).repeat_interleave(cols // scale.shape[1], 1)
    return values * scale.repeat_interleave(cols // scale.shape[1], 1)
