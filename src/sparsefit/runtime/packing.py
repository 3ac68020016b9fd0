"""The packed weight layout of the sparse kernels, as pure tensor functions (`csrc/packed.h`).

A weight (rows, cols) is cut into row blocks of `row_block` rows and column groups of 64 columns,
padded with zeros to whole blocks and groups. For each block and group, in that order: one 64-bit
mask word per row (bit j: the column at position j is kept), then the kept values of the block's
rows, row after row. Positions follow the columns, except that bf16 groups interleave each 32-column
half (position 2i holds column i, 2i + 1 column 16 + i) so the kernels widen them with a shift and
an AND instead of shuffles. The kernel walks a block's groups in order, so masks and values each stream linearly
(Sparse Llama's CPU speed-up rests on moving fewer bytes: arXiv:2405.03594; the masks cost one bit
per weight, the values only what is kept).

Values are bfloat16 (packing round-trips exactly to `weight.bfloat16()`) or int8 codes with one
float32 scale per output row (symmetric: code = round(w / scale), scale = max|w| / 127, or the
scales of a w8a16 export). A dense layout stores every value and no masks: where the density is
too high for the masks to pay, the same kernels run it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

GROUP = 64  # columns per mask word
ROW_BLOCK = 8  # rows per block (the kernels take 4, 8 or 16)
TAIL = 64  # values of zero padding after the last: the AVX2 loads read up to 16 bytes ahead
VALUE_TYPES = {"bfloat16": torch.bfloat16, "int8": torch.int8}


def _bf16_columns() -> torch.Tensor:
    """The column of each position of a bf16 group (see the module docstring)."""
    t = torch.arange(32)
    half = torch.where(t % 2 == 0, t // 2, 16 + t // 2)
    return torch.cat([half, half + 32])


COLUMNS = {"bfloat16": _bf16_columns(), "int8": torch.arange(GROUP)}  # position -> column, per value type


@dataclass(frozen=True)
class PackedWeight:
    rows: int
    cols: int
    row_block: int
    masks: torch.Tensor  # int64 (blocks * groups * row_block,); empty for the dense layout
    values: torch.Tensor  # bfloat16 or int8, (kept + TAIL,)
    block_offsets: torch.Tensor  # int64 (blocks + 1,): where each block starts in values
    scales: torch.Tensor | None  # float32 (rows,) for int8 values

    @property
    def dense(self) -> bool:
        return self.masks.numel() == 0

    @property
    def value_type(self) -> str:
        return "int8" if self.values.dtype == torch.int8 else "bfloat16"

    @property
    def kept(self) -> int:
        """Values stored, the zero tail excluded (every value of the padded weight when dense)."""
        return int(self.block_offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes resident: masks, values (tail included), offsets and scales."""
        parts = (self.masks, self.values, self.block_offsets, self.scales)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def int8_codes(weight: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 codes of `weight` and their scales (max|w| / 127 unless given, as those
    of a w8a16 export). A zero stays an exact zero code; an all-zero row gets scale 1."""
    scales = _row_scales(weight, scales)
    codes = torch.round(weight.detach().float() / scales[:, None]).clamp_(-128, 127).to(torch.int8)
    return codes, scales


CHUNK_ROWS = 1024  # rows packed at a time: the temporaries of packing stay a few times one chunk


def pack(
    weight: torch.Tensor,
    values: str = "bfloat16",
    dense: bool = False,
    row_block: int = ROW_BLOCK,
    scales: torch.Tensor | None = None,
) -> PackedWeight:
    """Pack a (rows, cols) weight, zeros pruned, in one pass; `scales` only with int8 values."""
    if weight.dim() != 2:
        raise ValueError(f"pack takes a 2-D weight, got shape {tuple(weight.shape)}")
    step = CHUNK_ROWS // row_block * row_block
    chunks = (weight[r : r + step] for r in range(0, weight.shape[0], step))
    return pack_chunks(chunks, weight.shape[1], values, dense, row_block, scales, weight.shape[0])


def pack_chunks(
    chunks: Iterable[torch.Tensor],
    cols: int,
    values: str = "bfloat16",
    dense: bool = False,
    row_block: int = ROW_BLOCK,
    scales: torch.Tensor | None = None,
    total_rows: int | None = None,
) -> PackedWeight:
    """Pack a weight handed over as consecutive runs of rows (each a multiple of `row_block` rows but
    the last), so that no more than one run need be dense at a time (an embedding read in pieces).
    With `total_rows` a dense layout is written straight into its final buffer (no copy at the end)."""
    if values not in VALUE_TYPES:
        raise ValueError(f"unknown value type '{values}'; use one of: {', '.join(VALUE_TYPES)}")
    if row_block not in (4, 8, 16):
        raise ValueError(f"row_block must be 4, 8 or 16, got {row_block}")
    if scales is not None and values != "int8":
        raise ValueError("scales are for int8 values only")
    parts, row_scales, rows = [], [], 0
    groups, dtype = -(-cols // GROUP), VALUE_TYPES[values]
    direct = None
    if dense and total_rows is not None:  # every value is stored: the buffer's size is known
        direct = torch.zeros(-(-total_rows // row_block) * row_block * groups * GROUP + TAIL, dtype=dtype)
    for chunk in chunks:
        if chunk.dim() != 2 or chunk.shape[1] != cols or (rows % row_block and chunk.shape[0]):
            raise ValueError(f"rows come in runs of whole row blocks of {cols} columns, got {tuple(chunk.shape)}")
        if not torch.isfinite(chunk).all():
            raise ValueError("the weight holds NaN or inf values; sparse layers pack finite weights only")
        if values == "int8":
            given = None if scales is None else scales.reshape(-1)[rows : rows + chunk.shape[0]]
            row_scales.append(_row_scales(chunk, given))
        part = _pack_rows(chunk, values, dense, row_block, row_scales[-1] if row_scales else None)
        if direct is not None:
            at = rows * groups * GROUP
            direct[at : at + part[1].numel()] = part[1]
            part = (part[0], torch.empty(0, dtype=dtype), part[2])  # (a view would keep the run alive)
        parts.append(part)
        rows += chunk.shape[0]
    if scales is not None and scales.numel() != rows:
        raise ValueError(f"int8 scales must be {rows} finite positive numbers, one per row")
    masks = torch.cat([m for m, _, _ in parts]) if parts else torch.empty(0, dtype=torch.int64)
    counts = torch.cat([c for _, _, c in parts]) if parts else torch.empty(0, dtype=torch.int64)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    if direct is not None and direct.numel() != offsets[-1] + TAIL:
        raise ValueError(f"total_rows {total_rows} but {rows} rows were given")
    padded = direct if direct is not None else torch.cat([*(v for _, v, _ in parts), torch.zeros(TAIL, dtype=dtype)])
    return PackedWeight(rows, cols, row_block, masks, padded, offsets, torch.cat(row_scales) if row_scales else None)


def _row_scales(weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    if scales is None:
        scales = weight.detach().float().abs().amax(dim=1) / 127.0
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    scales = scales.float().reshape(-1).contiguous()
    if scales.numel() != weight.shape[0] or not torch.isfinite(scales).all() or (scales <= 0).any():
        raise ValueError(f"int8 scales must be {weight.shape[0]} finite positive numbers, one per row")
    return scales


def _pack_rows(
    weight: torch.Tensor, values: str, dense: bool, row_block: int, scales: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masks, kept values, values per block) of a run of whole row blocks (the last may be ragged)."""
    rows, cols = weight.shape
    if values == "int8":
        stored, _ = int8_codes(weight, scales)
    else:
        stored = weight.detach().to(torch.bfloat16)
    groups, blocks = -(-cols // GROUP), -(-rows // row_block)
    stored = torch.nn.functional.pad(stored, (0, groups * GROUP - cols, 0, blocks * row_block - rows))
    tiles = stored.reshape(blocks, row_block, groups, GROUP).transpose(1, 2)  # (blocks, groups, R, 64)
    tiles = tiles[..., COLUMNS[values]]  # columns -> positions (a contiguous copy)
    if dense:
        counts = torch.full((blocks,), groups * row_block * GROUP, dtype=torch.int64)
        return torch.empty(0, dtype=torch.int64), tiles.reshape(-1), counts
    keep = tiles != 0
    bits = torch.ones(GROUP, dtype=torch.int64) << torch.arange(GROUP, dtype=torch.int64)
    masks = (keep.to(torch.int64) * bits).sum(-1).reshape(-1)  # distinct bits: the sum is their OR
    return masks, tiles[keep], keep.reshape(blocks, -1).sum(-1)  # kept in (block, group, row, column) order


def unpack(p: PackedWeight) -> torch.Tensor:
    """The float32 weight the kernels multiply by (bf16 values widened, int8 codes times their scales)."""
    groups, blocks = -(-p.cols // GROUP), -(-p.rows // p.row_block)
    shape = (blocks, groups, p.row_block, GROUP)
    stored = p.values[: p.kept].float()
    if p.dense:
        tiles = stored.reshape(shape)
    else:
        bits = (p.masks.reshape(*shape[:3], 1) >> torch.arange(GROUP, dtype=torch.int64)) & 1
        tiles = torch.zeros(shape, dtype=torch.float32)
        tiles[bits.bool()] = stored
    columns = torch.empty_like(tiles)
    columns[..., COLUMNS[p.value_type]] = tiles  # positions -> columns
    weight = columns.transpose(1, 2).reshape(blocks * p.row_block, groups * GROUP)[: p.rows, : p.cols]
    return weight * p.scales[:, None] if p.scales is not None else weight.contiguous()
