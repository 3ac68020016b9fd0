"""2:4 models on NVIDIA's sparse tensor cores, converted in memory for serving or measuring.

Two kernels take a 2:4 weight (two nonzeros in every four inputs of a row) and skip its zeros:

- `fp8`: torchao's FP8 2:4 (`Float8DynamicActivationFloat8WeightConfig`, per-row scales, packing
  `SPARSE_2D_DATA_2D_METADATA`, CUTLASS kernels for sm90, i.e. Hopper): activations are quantized
  to FP8 per token at run time, weights once, with the scaling fused into the sparse product.
- `bf16`: PyTorch's `to_sparse_semi_structured` (cuSPARSELt or CUTLASS, sm80 and later): the same
  values as the bf16 model, stored compressed. On Hopper, PyTorch's CUTLASS backend refuses sm90; its
  cuSPARSELt one beats dense bf16 per linear on the GPU, but a whole prefill ran at half dense bf16's
  speed (`benchmarks/README.md`): use `fp8` there.

Only decoder linears that are exactly 2:4 are converted; embeddings and the head stay dense. The
converted model computes forwards only (no training, no safetensors save): convert after
`load_model`, at serving or benchmarking time. `benchmarks/sparse24_gpu.py` measures both kernels
against bf16 and FP8 dense.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models.layout import decoder_linears, weight_as_out_in
from sparsefit.pruning.structure import Structure

KINDS = ("fp8", "bf16")
TWO_FOUR = Structure(2, 4)
# Oldest compute capability of each kernel: CUTLASS FP8 2:4 is built for sm90, semi-structured bf16 for sm80.
MIN_CAPABILITY = {"fp8": (9, 0), "bf16": (8, 0)}


class TokenRowsLinear(nn.Linear):
    """An `nn.Linear` that hands its weight's kernel 2-D inputs: torchao's FP8 2:4 kernel takes
    (tokens, features) only, while decoder blocks call linears on (batch, sequence, features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _token_rows(model: nn.Module, names: set[str]) -> None:
    """Re-class the linears `names` of `model` as `TokenRowsLinear`, keeping their parameters."""
    for name in names:
        module = model.get_submodule(name)
        if type(module) is nn.Linear:
            module.__class__ = TokenRowsLinear  # a subclass with only forward changed: same state, same names


def two_four_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder linears of `model` whose weights are exactly 2:4 along their inputs, by name."""
    return {
        name: m
        for name, m in decoder_linears(model).items()
        if isinstance(m, nn.Linear) and TWO_FOUR.holds(weight_as_out_in(m))
    }


def fp8_config(two_four: bool = True):  # noqa: ANN201 - a torchao config, imported lazily
    """torchao's FP8 config: per-row FP8 weights and per-token FP8 activations, with CUTLASS's 2:4
    packing (`two_four`) or without it, the like-for-like dense baseline."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
        from torchao.quantization.quantize_.workflows.float8.float8_packing_format import Float8PackingFormat
    except ImportError:
        raise UsageError("FP8 2:4 needs torchao: pip install 'sparsefit[gpu]'") from None
    if not two_four:
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    # torchao 0.18 renamed SPARSE_CUTLASS (0.14-0.17) to SPARSE_2D_DATA_2D_METADATA; both name the CUTLASS packing.
    packing = getattr(Float8PackingFormat, "SPARSE_2D_DATA_2D_METADATA", None) or Float8PackingFormat.SPARSE_CUTLASS
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), packing_format=packing)


def check_device(kind: str, device: str | torch.device) -> None:
    """A usage error unless `device` is a CUDA GPU that runs `kind`'s kernels."""
    if kind not in KINDS:
        raise UsageError(f"unknown 2:4 kernel '{kind}'; use one of: {', '.join(KINDS)}")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UsageError(
            f"2:4 {kind} kernels run on an NVIDIA GPU; the model is on {device}: load it with --device cuda"
        )
    have, need = torch.cuda.get_device_capability(device), MIN_CAPABILITY[kind]
    if have < need:
        raise UsageError(
            f"2:4 {kind} kernels need compute capability {need[0]}.{need[1]} or newer; this GPU has "
            f"{have[0]}.{have[1]}" + (" (the 'bf16' kernel runs on it)" if kind == "fp8" and have >= (8, 0) else "")
        )


def to_sparse24(model: nn.Module, kind: str = "fp8") -> dict:
    """Convert every 2:4 decoder linear of `model` (bf16, on a CUDA GPU) to `kind`'s sparse kernel, in place.

    Returns the layers converted and those left dense (with why). A model with no 2:4 linear is a
    usage error: prune it with `--structure 2:4` first.
    """
    first = next(model.parameters())
    if first.dtype != torch.bfloat16:
        raise UsageError(f"2:4 kernels take a bfloat16 model, this one is {first.dtype}: load it with --dtype bfloat16")
    check_device(kind, first.device)
    found = two_four_linears(model)
    if not found:
        raise UsageError("no decoder linear of this model is 2:4 sparse: prune it with --structure 2:4 first")
    skipped: dict[str, str] = {}
    if kind == "fp8":
        config = fp8_config()  # a usage error when torchao is missing
        from torchao.quantization import quantize_

        converted = set(found)
        _token_rows(model, converted)
        quantize_(model, config, filter_fn=lambda m, name: name in converted)
        # torchao leaves a weight whose shape its FP8 kernels cannot take as it was: find those.
        for name, module in found.items():
            if type(module.weight) in (torch.Tensor, nn.Parameter):
                skipped[name] = "shape unsupported by the FP8 kernel (dimensions must be multiples of 16)"
    else:
        from torch.sparse import to_sparse_semi_structured

        for name, module in found.items():
            try:
                packed = to_sparse_semi_structured(module.weight.detach())  # bf16, checked above
            except (RuntimeError, ValueError) as err:  # e.g. a shape the kernel's tiles do not fit
                skipped[name] = str(err).splitlines()[0]
                continue
            module.weight = nn.Parameter(packed, requires_grad=False)
    return {"kind": kind, "converted": len(found) - len(skipped), "skipped": skipped}
