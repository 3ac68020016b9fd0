"""Writing compact sparse checkpoints in the bitmask layouts of compressed-tensors up to 0.14.

The layouts and their reader live in `sparsefit.models.bitmask` (every loader needs the reader);
this is the writer: a weight's parts from its nonzeros, a state dict compressed, and the config
block that declares the format.
"""

from __future__ import annotations

import json

import torch

from sparsefit.models.bitmask import pack_bitmask
from sparsefit.models.expert_store import FORMAT as EXPERTS_FORMAT
from sparsefit.models.experts import ExpertMatrix
from sparsefit.pruning.structure import Structure
from sparsefit.quantization.scheme import Grid, group_view


def _positive_zeros(weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype == torch.float8_e4m3fn:  # no arithmetic on float8: clear the sign bit of zeros
        raw = weight.view(torch.uint8)
        return torch.where(raw == 0x80, torch.zeros_like(raw), raw).view(torch.float8_e4m3fn)
    return weight + 0 if weight.is_floating_point() else weight


def _nonzero(weight: torch.Tensor) -> torch.Tensor:
    raw = weight.view(torch.uint8) & 0x7F if weight.dtype == torch.float8_e4m3fn else weight
    return raw != 0


def _select(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """weight[mask], also for float8 (indexed through its raw bytes)."""
    if weight.dtype == torch.float8_e4m3fn:
        return weight.view(torch.uint8)[mask].view(torch.float8_e4m3fn)
    return weight[mask]


def compress_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `sparse-bitmask` parts of a 2-D weight (suffixes `compressed`, `bitmask`, `row_offsets`, `shape`)."""
    weight = _positive_zeros(weight)
    mask = _nonzero(weight)
    counts = mask.sum(-1)
    return {
        "compressed": _select(weight, mask),
        "bitmask": pack_bitmask(mask),
        "row_offsets": torch.cumsum(counts, 0) - counts,
        "shape": torch.tensor(weight.shape, dtype=torch.int64),
    }


def compress_24_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `sparse-24-bitmask` parts of a 2:4-sparse 2-D weight (suffixes `compressed`, `bitmask`, `shape`)."""
    rows, cols = weight.shape
    weight = _positive_zeros(weight)
    nonzero = _nonzero(weight)
    if not Structure(2, 4).holds(nonzero):
        raise ValueError("the weight is not 2:4 sparse along its input columns; use sparse-bitmask")
    # Keep every nonzero, then as many zeros as each group of four needs to keep exactly two.
    order = torch.sort(nonzero.reshape(rows, -1, 4).to(torch.int8), dim=-1, descending=True, stable=True).indices
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True).reshape(rows, cols)
    return {
        "compressed": _select(weight, keep).reshape(rows, cols // 2),
        "bitmask": pack_bitmask(keep),
        "shape": torch.tensor([[rows], [cols]], dtype=torch.int64),
    }


SPARSITY_STRUCTURES = {"sparse-bitmask": "unstructured", "sparse-24-bitmask": "2:4"}
# Written as compressed-tensors 0.14 wrote it (the last version that read these formats).
LEGACY_VERSION = "0.14.0"


def compress_state_dict(state: dict[str, torch.Tensor], names: list[str], fmt: str) -> dict[str, torch.Tensor]:
    """`state` with the weight of each linear in `names` replaced by its `fmt` parts."""
    compress = compress_bitmask if fmt == "sparse-bitmask" else compress_24_bitmask
    out = dict(state)
    for name in names:
        try:
            parts = compress(out.pop(f"{name}.weight"))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        out.update({f"{name}.{key}": value for key, value in parts.items()})
    return out


def legacy_quantization_config(fmt: str, names: list[str], overall: float) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "version": LEGACY_VERSION,
        "sparsity_config": {
            "format": fmt,
            "global_sparsity": overall,
            "sparsity_structure": SPARSITY_STRUCTURES[fmt],
            "targets": names,
            "ignore": [],
            "registry_requires_subclass": False,
        },
    }


def compress_experts(
    model: torch.nn.Module,
    scales: dict[str, torch.Tensor] | None = None,
    grid: Grid | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The tensors and metadata of `experts.safetensors` (`models.expert_store`) for every fused expert
    parameter of the decoder blocks, and those parameters' state-dict names (left out of the main
    weights). Each expert slice is stored in the sparse-bitmask layout: as its values, or, for a slice
    in `scales` (quantized on `grid`), as int8 / float8 codes with its `weight_scale` in `scale_dtype`.
    """
    from sparsefit.models.layout import decoder_linears

    tensors, shapes, transposed = {}, {}, set()
    for name, layer in decoder_linears(model).items():
        if not isinstance(layer, ExpertMatrix):
            continue
        shapes[name.rsplit(".", 1)[0]] = list(getattr(layer.module, layer.param).shape)
        if layer.spec.transposed:  # stored (experts, in, out): the slices are kept (out, in) all the same
            transposed.add(name.rsplit(".", 1)[0])
        weight = layer.weight.detach()
        if scales is not None and name in scales:
            scale = scales[name]
            codes = grid.codes(group_view(weight.float(), grid.group_size), scale.unsqueeze(-1)).reshape(weight.shape)
            codes = codes.to(torch.float8_e4m3fn if grid.kind == "float" else torch.int8)
            parts = {**compress_bitmask(codes), "weight_scale": scale.to(scale_dtype)}
        else:
            parts = compress_bitmask(weight)
        tensors.update({f"{name}.{key}": value.contiguous() for key, value in parts.items()})
    metadata = {"format": EXPERTS_FORMAT, "experts": json.dumps(shapes), "transposed": json.dumps(sorted(transposed))}
    return tensors, metadata, list(shapes)
