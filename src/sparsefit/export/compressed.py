"""Quantized checkpoints in compressed-tensors' formats, which transformers (through compressed-tensors)
and vLLM load as ordinary quantized models.

- w4a16, w8a16: `pack-quantized` (integer codes packed into int32, per-group or per-channel scales);
- w8a8-int8: `int-quantized` (int8 codes, per-channel scales; activations quantized per token at run time);
- w8a8-fp8: `float-quantized` (float8 e4m3 codes, per-channel scales; activations likewise).

The weights are packed by compressed-tensors' own compressors, so the layout is the one its loader
reads. Fused expert tensors (experts, out, in), which these formats do not describe, go to
`experts.safetensors`: each expert's int8 / float8 codes in the sparse-bitmask layout with its scales
(`models.expert_store`), restored by sparsefit's loader; other loaders find the experts missing.

The model's config gets a `quantization_config` whose `sparsity_config` is empty: loaders
that refuse sparse checkpoints (vLLM refuses any non-empty sparsity targets) take these. The
sparsity is written down in `sparsity.json` beside the weights instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.export.bitmask import compress_experts, compress_state_dict, legacy_quantization_config
from sparsefit.export.checkpoint import save_checkpoint, sparsity_summary
from sparsefit.models.experts import ExpertMatrix
from sparsefit.models.finite import refuse_non_finite
from sparsefit.models.layout import decoder_linears
from sparsefit.quantization.config import SCHEMES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sparsefit.quantization.quantize import QuantizeResult

FORMATS = {"w4a16": "pack-quantized", "w8a16": "pack-quantized", "w8a8-int8": "int-quantized",
           "w8a8-fp8": "float-quantized"}  # fmt: skip


def _compressed_tensors():  # noqa: ANN202 - the module
    try:
        import compressed_tensors
    except ImportError:
        raise UsageError(
            "quantized exports need compressed-tensors: pip install 'sparsefit[export]' (or compressed-tensors)"
        ) from None
    return compressed_tensors


def ct_scheme(scheme: str, group_size: int | None):  # noqa: ANN201 - a compressed_tensors QuantizationScheme
    """The compressed-tensors scheme matching sparsefit's grid for `scheme` (symmetric, static weights)."""
    _compressed_tensors()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    kind, bits, _, quantized_inputs = SCHEMES[scheme]
    weights = QuantizationArgs(
        num_bits=bits,
        type=kind,
        symmetric=True,
        dynamic=False,
        strategy="group" if group_size else "channel",
        group_size=group_size,
    )
    inputs = None
    if quantized_inputs:
        inputs = QuantizationArgs(num_bits=8, type=kind, symmetric=True, dynamic=True, strategy="token")
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def expert_names(model: nn.Module) -> set[str]:
    """Names of the expert matrices (slices of fused expert tensors) of the decoder blocks."""
    return {name for name, layer in decoder_linears(model).items() if isinstance(layer, ExpertMatrix)}


def compressed_state_dict(
    model: nn.Module, result: QuantizeResult, leave_out: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The model's tensors with each quantized linear's weight replaced by its compressed parts;
    `leave_out`: state-dict names not to write (fused expert tensors, stored apart)."""
    _compressed_tensors()
    from compressed_tensors.compressors import BaseCompressor

    config = result.report.config
    dtype = getattr(torch, config.export_dtype)
    scheme = ct_scheme(config.scheme, result.grid.group_size)
    compressor = BaseCompressor.get_value_from_registry(FORMATS[config.scheme])
    state = {k: v for k, v in model.state_dict().items() if k not in leave_out}
    experts = expert_names(model)
    where = f"cannot export in {config.export_dtype}"
    fix = "use --export-dtype bfloat16 or float32" if dtype == torch.float16 else "start from a sound checkpoint"
    # The scales and the tensors cast to `dtype` below: finite, and within its range, before any is packed.
    refuse_non_finite({f"{n}.weight_scale": s for n, s in result.scales.items()}, where, fix, cast_to=dtype)
    cast_to = {k: v for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float8_e4m3fn}
    refuse_non_finite(cast_to, where, fix, cast_to=dtype)
    for name, scale in result.scales.items():
        if name in experts:  # written apart (`export.bitmask.compress_experts`)
            continue
        weight = state.pop(f"{name}.weight")
        # The scale was rounded to `dtype` before the codes were chosen: storing it there is exact.
        parts = compressor.compress({"weight": weight, "weight_scale": scale.to(dtype)}, scheme)
        state.update({f"{name}.{key}": value.contiguous() for key, value in parts.items()})
    cast: dict[tuple, torch.Tensor] = {}  # tied tensors (embeddings and head) stay one tensor
    for key, value in state.items():
        if value.is_floating_point() and value.dtype not in (dtype, torch.float8_e4m3fn):
            state[key] = cast.setdefault((value.data_ptr(), value.shape, value.stride()), value.to(dtype))
    return state


def quantization_config(model: nn.Module, result: QuantizeResult) -> dict:
    """config.json's `quantization_config`: the scheme for every nn.Linear but those left alone."""
    ct = _compressed_tensors()
    from compressed_tensors.quantization import QuantizationConfig

    config = result.report.config
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    experts = expert_names(model)
    missing = [name for name in result.scales if name not in linears and name not in experts]
    if missing:
        raise UsageError(
            f"{missing[0]} is not a torch Linear, so compressed-tensors formats cannot describe it; "
            "export this model as a plain checkpoint (--format hf)"
        )
    ignore = [name for name in linears if name not in result.scales]
    qc = QuantizationConfig(
        config_groups={"group_0": ct_scheme(config.scheme, result.grid.group_size)},
        format=FORMATS[config.scheme],
        quantization_status="compressed",
        ignore=ignore,
    )
    return {
        **qc.model_dump(mode="json", exclude={"quant_method"}),
        "quant_method": "compressed-tensors",
        "version": ct.__version__,
        "sparsity_config": {},
        "transform_config": {},
    }


def dense_bf16_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct tensors at 2 bytes each: the size of a dense bf16 checkpoint."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            seen[t.untyped_storage().data_ptr()] = t.numel()
    return 2 * sum(seen.values())


def save_quantized(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    result: QuantizeResult,
    metadata: dict | None = None,
) -> dict:
    """Write `model` (quantized by `quantize`) in its scheme's compressed-tensors format, atomically.

    Returns what was written: format, files, bytes on disk, the ratio to a dense bf16 checkpoint,
    and the sparsity measured on the weights.
    """
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model, result)
    config["dtype"] = result.report.config.export_dtype
    # Fused expert tensors: each expert's codes and scales in experts.safetensors (`models.expert_store`).
    dtype = getattr(torch, result.report.config.export_dtype)
    experts = compress_experts(model, result.scales, result.grid, dtype)
    state = compressed_state_dict(model, result, tuple(experts[2]))
    sparsity = sparsity_summary(model)
    fmt = result.report.config.sparse_format
    if fmt != "none":  # the codes of each layer (its `weight`) in the legacy bitmask layout
        inside = expert_names(model)
        names = [name for name in result.scales if name not in inside]
        try:
            state = compress_state_dict(state, names, fmt)
        except ValueError as err:
            raise UsageError(
                f"{err}: prune with --structure 2:4 first, or use --sparse-format sparse-bitmask"
            ) from None
        legacy = legacy_quantization_config(fmt, names, sparsity["overall"])
        config["quantization_config"].update(sparsity_config=legacy["sparsity_config"], version=legacy["version"])
    out_dir = Path(out_dir)
    save_checkpoint(
        model,
        tokenizer,
        out_dir,
        {**(metadata or {}), "quantization": result.report.to_json(), "format": FORMATS[result.report.scheme]},
        extra_files={"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"},
        state_dict=state,
        sparsity=sparsity,
        experts=experts[:2] if experts[2] else None,
    )
    files = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    weights = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    dense = dense_bf16_bytes(model)
    return {
        "format": FORMATS[result.report.scheme] if fmt == "none" else f"{FORMATS[result.report.scheme]}+{fmt}",
        "scheme": result.report.scheme,
        "files": files,
        "bytes": size,
        "weight_bytes": weights,
        "dense_bf16_bytes": dense,
        "ratio_to_dense_bf16": weights / dense,
        "sparsity": sparsity["overall"],
        "revived_weights": result.report.revived_weights,
    }
