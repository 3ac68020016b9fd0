"""`SparseLinear`: a linear layer whose weight lives only in the kernels' packed layout."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sparsefit.runtime.kernels import choose_isa
from sparsefit.runtime.packing import ROW_BLOCK, PackedWeight, pack, pack_chunks, unpack

# Above this density the dense layout (no masks, no expansion) runs faster than the bitmask one:
# the crossover benchmarks/runtime.py measures at batch 1 (its `crossover` rows: with the kernels
# prefetching, bf16 bitmask is faster up to density 0.9 and slower at 0.95; int8 bitmask is still
# faster at 0.95, the densest point measured), per value type.
DENSE_ABOVE = {"bfloat16": 0.92, "int8": 0.95}


class SparseLinear(nn.Module):
    """y = x W^T + b with W packed (`runtime.packing`): fp32 activations in and out, fp32 accumulation.

    Nothing else is resident: no dense copy of W is kept; `to_dense()` rebuilds the exact float32
    weight the kernels multiply by. Inference only (no gradients).
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, isa: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = packed.cols, packed.rows
        self.row_block, self.isa = packed.row_block, choose_isa(isa)
        self.register_buffer("masks", packed.masks, persistent=False)
        self.register_buffer("values", packed.values, persistent=False)
        self.register_buffer("block_offsets", packed.block_offsets, persistent=False)
        self.register_buffer("scales", packed.scales, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        values: str = "bfloat16",
        layout: str = "auto",
        isa: str | None = None,
        scales: torch.Tensor | None = None,
        row_block: int = ROW_BLOCK,
    ) -> SparseLinear:
        """Pack `linear`'s weight. `layout`: bitmask | dense | auto (dense above the measured density
        crossover, `DENSE_ABOVE`); `scales`: per-row int8 scales to keep (those of a w8a16 export)."""
        return cls.from_weight(linear.weight.data, linear.bias, values, layout, isa, scales, row_block)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        values: str = "bfloat16",
        layout: str = "auto",
        isa: str | None = None,
        scales: torch.Tensor | None = None,
        row_block: int = ROW_BLOCK,
    ) -> SparseLinear:
        if layout not in ("auto", "bitmask", "dense"):
            raise ValueError(f"unknown layout '{layout}'; use auto, bitmask or dense")
        if layout == "auto":
            density = float((weight != 0).float().mean()) if weight.numel() else 1.0
            layout = "dense" if density > DENSE_ABOVE.get(values, 1.0) else "bitmask"
        packed = pack(weight, values, layout == "dense", row_block, scales)
        return cls(packed, bias, isa)

    @classmethod
    def from_chunks(
        cls,
        chunks: Iterable[torch.Tensor],
        cols: int,
        values: str = "bfloat16",
        isa: str | None = None,
        row_block: int = ROW_BLOCK,
        rows: int | None = None,
    ) -> SparseLinear:
        """A dense-layout layer from runs of rows (a large embedding table read piece by piece)."""
        return cls(pack_chunks(chunks, cols, values, True, row_block, total_rows=rows), None, isa)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(
            self.out_features, self.in_features, self.row_block, self.masks, self.values, self.block_offsets,
            self.scales,
        )  # fmt: skip

    @property
    def layout(self) -> str:
        return "dense" if self.masks.numel() == 0 else "bitmask"

    @property
    def value_type(self) -> str:
        return "int8" if self.values.dtype == torch.int8 else "bfloat16"

    @property
    def nbytes(self) -> int:
        """Bytes resident for the weight (masks, values, offsets, scales) and the bias."""
        return self.packed.nbytes + (0 if self.bias is None else self.bias.numel() * 4)

    def to_dense(self) -> torch.Tensor:
        """The exact float32 weight (out_features, in_features) this layer multiplies by."""
        return unpack(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.sparsefit.linear(
            x if x.dtype == torch.float32 else x.float(), self.masks, self.values, self.block_offsets,
            self.scales, self.bias, self.out_features, self.in_features, self.row_block, self.isa,
        )  # fmt: skip
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, values={self.value_type}, "
            f"layout={self.layout}, isa={self.isa}, bias={self.bias is not None}"
        )
