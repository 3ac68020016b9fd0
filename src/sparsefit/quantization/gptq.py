"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), following IST-DASLab's `gptq.py` (`fasterquant`), made mask-preserving.

Columns are quantized left to right; each column's rounding error is spread over the columns to
its right through the upper Cholesky factor of H^-1 (within a block of `block_size` columns one by
one, then to the columns right of the block at once: the "lazy batch" update). A group's scale is
set when its first column is reached, from the weights as updated so far.

Mask preservation (SparseGPT's joint sparsify-and-quantize, Sec. 3.5 of the SparseGPT paper): a
pruned weight is "quantized" to exactly 0, and whatever the updates of earlier columns had added to
it is part of its column's error, compensated in the columns to its right like any rounding error.
The result is zero at every pruned position, and all of the compensation ends in kept weights.

Activation order (the GPTQ paper's "act-order", llm-compressor's `actorder`; `gptq` below): the
columns are visited in descending diag(H) order, so the inputs with the most energy are rounded
first, while the most columns remain to absorb their error. "static" keeps the groups contiguous in
the original column order and takes every group's scale up front from the original weights, so the
export needs no column map; "dynamic" forms the groups in visiting order, each scale from the
weights as updated so far, which needs the map `g_idx` (input column -> group) to dequantize.
"""

from __future__ import annotations

from typing import Literal

import torch

from sparsefit.pruning.sparsegpt import inverse_hessian
from sparsefit.quantization.observer import Observer, choose_scale
from sparsefit.quantization.scheme import Grid, group_view

ActOrder = Literal["none", "static", "dynamic"]


def quantize_gptq(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    dead: torch.Tensor,
    grid: Grid,
    keep: torch.Tensor | None = None,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    observer: Observer = "minmax",
    scales: torch.Tensor | None = None,
    group_of: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (dequantized float32 weight, scale (out, groups)), columns in the order given.

    `hinv`, `dead`: from `sparsefit.pruning.sparsegpt.inverse_hessian` (the upper Cholesky factor of
    the dampened H^-1, and the inputs that never fired, whose weights are zeroed). `keep` (out, in):
    positions allowed to be nonzero (default: all); the others come out exactly 0. By default the
    groups are runs of `group_size` columns, each scale chosen by `observer` when the sweep reaches
    the group; `scales` (out, groups) fixed up front with `group_of` (in,), each column's group, replace that.
    """
    rows, cols = weight.shape
    if hinv.shape != (cols, cols):
        raise ValueError(f"inverse Hessian {tuple(hinv.shape)} does not match {cols} input columns")
    group = grid.group_size or cols
    if cols % group:
        raise ValueError(f"{cols} input columns are not a multiple of group_size {group}")
    W = weight.detach().to(torch.float32, copy=True)
    W[:, dead] = 0
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.to(W.device)
    W.mul_(keep)
    Q = torch.zeros_like(W)
    fixed = scales is not None
    if not fixed:
        scales = torch.empty(rows, cols // group, dtype=torch.float32, device=W.device)
    if group_of is None:
        group_of = torch.arange(cols, device=W.device) // group
    group_of = group_of.tolist()
    for b1 in range(0, cols, block_size):
        b2 = min(b1 + block_size, cols)
        W1, Hinv1, K1 = W[:, b1:b2], hinv[b1:b2, b1:b2], keep[:, b1:b2]
        Err1 = torch.zeros_like(W1)
        for i in range(b2 - b1):
            col = b1 + i
            if not fixed and col % group == 0:
                # The group's columns as updated so far (W1 is a view of W); only kept weights
                # count, since the pruned ones will be 0 whatever the scale.
                current = W[:, col : col + group] * keep[:, col : col + group]
                scales[:, col // group] = choose_scale(current, grid, observer, scale_dtype)
            s = scales[:, group_of[col]]
            w = W1[:, i]
            q = torch.where(K1[:, i], grid.fake_quantize(w, s), 0.0)
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, b2:].sub_(Err1 @ hinv[b1:b2, b2:])
    return Q, scales


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    keep: torch.Tensor | None = None,
    actorder: ActOrder = "static",
    observer: Observer = "mse",
    damp: float = 0.01,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and its (in, in) Hessian -> (dequantized float32 weight, scales (out, groups),
    g_idx): `g_idx` (in,) is each input column's group for actorder "dynamic", None otherwise (the
    groups are then runs of `group_size` columns in the original order)."""
    rows, cols = weight.shape
    keep = torch.ones_like(weight, dtype=torch.bool) if keep is None else keep
    if actorder == "none":
        hinv, dead = inverse_hessian(hessian, damp)
        q, scales = quantize_gptq(weight, hinv, dead, grid, keep, block_size, scale_dtype, observer)
        return q, scales, None
    if actorder not in ("static", "dynamic"):
        raise ValueError(f"unknown actorder {actorder!r}: none, static or dynamic")
    group = grid.group_size or cols
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    inverse = torch.argsort(perm)
    hinv, dead = inverse_hessian(hessian, damp, order=perm)
    w, k = weight[:, perm], keep[:, perm]
    if actorder == "dynamic":
        q, scales = quantize_gptq(w, hinv, dead, grid, k, block_size, scale_dtype, observer)
        return q[:, inverse], scales, (torch.arange(cols, device=weight.device) // group)[inverse]
    # static: every scale from the original (kept, live) weights of its group in the original order
    original = weight.detach().float() * keep
    original[:, perm[dead]] = 0
    scales = choose_scale(group_view(original, group), grid, observer, scale_dtype)
    q, _ = quantize_gptq(w, hinv, dead, grid, k, block_size, scale_dtype, observer, scales, perm // group)
    return q[:, inverse], scales, None
