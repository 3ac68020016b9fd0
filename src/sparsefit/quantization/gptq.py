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
"""

from __future__ import annotations

import torch

from sparsefit.quantization.scheme import Grid


def quantize_gptq(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    dead: torch.Tensor,
    grid: Grid,
    keep: torch.Tensor | None = None,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (dequantized float32 weight, scale (out, groups)).

    `hinv`, `dead`: from `sparsefit.pruning.sparsegpt.inverse_hessian` (the upper Cholesky factor of
    the dampened H^-1, and the inputs that never fired, whose weights are zeroed). `keep` (out, in):
    positions allowed to be nonzero (default: all); the others come out exactly 0.
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
    scales = torch.empty(rows, cols // group, dtype=torch.float32, device=W.device)
    for b1 in range(0, cols, block_size):
        b2 = min(b1 + block_size, cols)
        W1, Hinv1, K1 = W[:, b1:b2], hinv[b1:b2, b1:b2], keep[:, b1:b2]
        Err1 = torch.zeros_like(W1)
        for i in range(b2 - b1):
            col = b1 + i
            if col % group == 0:
                # The group's columns as updated so far (W1 is a view of W); only kept weights
                # count, since the pruned ones will be 0 whatever the scale.
                amax = (W[:, col : col + group] * keep[:, col : col + group]).abs().amax(1)
                scales[:, col // group] = grid.scale(amax, scale_dtype)
            s = scales[:, col // group]
            w = W1[:, i]
            q = torch.where(K1[:, i], grid.fake_quantize(w, s), 0.0)
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, b2:].sub_(Err1 @ hinv[b1:b2, b2:])
    return Q, scales
