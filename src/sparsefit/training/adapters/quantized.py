"""A frozen 4-bit base for parameter-efficient fine-tuning (QLoRA's idea, Dettmers et al., 2023,
with the project's own symmetric integer grid, `quantization.scheme`, instead of NF4).

Each targeted linear's weight is stored as group-wise INT4 codes, two per byte, and one scale per
row and group; a parametrization (`torch.nn.utils.parametrize`) dequantizes it on the fly whenever
the layer reads its weight, so the module stays a plain linear that LoRA (peft) wraps as usual. The
grid is symmetric, so a pruned weight is exactly zero after dequantization. `dequantize_base`
turns the base back into ordinary float weights (the dequantized values) before a merge and save.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from sparsefit.models.layout import weight_as_out_in
from sparsefit.quantization.scheme import Grid, group_view, quantize_rtn


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes in [-8, 7], (out, in) with `in` even -> uint8 (out, in / 2), low nibble first."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing two codes per byte needs an even number of inputs, got {codes.shape[-1]}")
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: int8 codes (out, in)."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


class Int4Dequantize(nn.Module):
    """Parametrization: packed codes (the stored tensor) -> the layer's weight in `dtype`."""

    def __init__(self, scale: torch.Tensor, group_size: int, dtype: torch.dtype, transposed: bool) -> None:
        super().__init__()
        self.register_buffer("scale", scale)  # (out, groups), float32
        self.group_size = group_size
        self.dtype = dtype
        self.transposed = transposed  # GPT-2's Conv1D stores (in, out)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        codes = group_view(unpack_int4(packed).float(), self.group_size)
        weight = (codes * self.scale.unsqueeze(-1)).flatten(1).to(self.dtype)
        return weight.t() if self.transposed else weight


def quantize_base_(linears: dict[str, nn.Module], group_size: int = 64) -> dict[str, torch.Tensor]:
    """Store each linear's weight in 4 bits, in place; returns each layer's residual W - dequant(quant(W))
    as (out, in) float32, for initialising adapters from it."""
    grid = Grid("int", 4, group_size)
    for name, module in linears.items():  # checked first: a failure leaves every layer as it was
        inputs = weight_as_out_in(module).shape[1]
        if inputs % group_size or inputs % 2:
            raise ValueError(f"{name} has {inputs} inputs, not a multiple of group size {group_size} (and of 2)")
    residuals = {}
    for name, module in linears.items():
        weight = weight_as_out_in(module).float()
        dequantized, scale = quantize_rtn(weight, grid)
        codes = group_view(dequantized, group_size) / scale.unsqueeze(-1)
        packed = pack_int4(codes.round().flatten(1))
        residuals[name] = weight - dequantized
        dtype = module.weight.dtype
        module.weight = nn.Parameter(packed, requires_grad=False)
        parametrize.register_parametrization(
            module, "weight", Int4Dequantize(scale, group_size, dtype, isinstance(module, Conv1D)), unsafe=True
        )
    return residuals


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight")
        and any(isinstance(p, Int4Dequantize) for p in m.parametrizations.weight)
    }


@torch.no_grad()
def dequantize_base(model: nn.Module) -> int:
    """Give every 4-bit linear its dequantized weight as an ordinary parameter; returns how many."""
    found = quantized_modules(model)
    for module in found.values():
        value = module.weight.detach().clone()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight = nn.Parameter(value, requires_grad=False)
    return len(found)


def base_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold (packed codes count as stored)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
