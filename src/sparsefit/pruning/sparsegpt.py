"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"), following IST-DASLab's `sparsegpt.py` (`add_batch` / `fasterprune`).

The statistics are H = 2 X X^T / n; the solver prunes column blocks left to right. Inside a
block each pruned weight's error is propagated to the remaining columns of the block through
the upper Cholesky factor of H^-1 (the OBS update, Eq. 3 of the paper); the columns right of the
block receive the block's accumulated error at once (the "lazy batch" update, Sec. 3.2). The same
lazy update is applied once more inside the block, every `SUB_BLOCK` columns, so the one-column
updates touch 16 columns instead of up to 128 (identical result up to rounding, far less memory traffic).
The inversion is split from the solve so layers that share an input (q/k/v) invert H once.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch

from sparsefit.pruning.structure import UNSTRUCTURED, Structure, check_sparsity, float_mask, preserved, topk_keep_mask

# Columns whose OBS updates run one by one; the rest of the column block gets them as one product.
SUB_BLOCK = 16


def inverse_hessian(
    hessian: torch.Tensor, damp: float = 0.01, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """H (cols, cols) -> (upper Cholesky factor of (H + damp * mean(diag H) I)^-1, dead-input bool (cols,)).

    `hessian` is not modified. Inputs that never fired (H_jj = 0) get H_jj = 1 so the factorization
    exists; the solver zeroes their weights since they never influenced the output. `order` (cols,):
    the factor of H with its inputs in that order (GPTQ's act-order), permuted in the one copy made here.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"Hessian must be square (cols, cols), got shape {tuple(hessian.shape)}")
    if damp < 0:
        raise ValueError(f"damp {damp} is negative; use a small positive fraction such as 0.01")
    if not torch.isfinite(hessian.sum(dtype=torch.float64)):  # NaN/inf propagate; one pass, no bool tensor
        raise ValueError("Hessian has NaN/inf entries; check the calibration activations (e.g. fp16 overflow)")
    diag = torch.diag(hessian).to(torch.float32, copy=True)
    if order is not None:
        diag = diag[order]
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    # With J the order reversal and J H J = L L^T: H^-1 = U^T U for the upper U = J L^-1 J. One
    # Cholesky and one triangular inverse, half the work of cholesky -> cholesky_inverse -> cholesky.
    # Each in x in buffer is dropped as soon as the next exists (at 14336 inputs each is 822 MB).
    if order is None:
        H = hessian.detach().flip(0, 1).to(torch.float32)  # J H J, a copy
    else:
        rev = order.flip(0)
        H = hessian.detach()[rev.unsqueeze(1), rev].to(torch.float32)  # J P H P^T J, one gather
    H.diagonal().copy_(diag.flip(0))
    factor, info = torch.linalg.cholesky_ex(H)
    del H
    if info.item() != 0:
        raise ValueError(
            f"its Hessian is not positive definite with damp={damp}; raise damp (--damp 0.1) or use more "
            "calibration data (--num-samples)"
        )
    inverse = _lower_triangular_inverse(factor)
    del factor
    return inverse.flip(0, 1), dead


def _lower_triangular_inverse(L: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """L^-1 for lower-triangular L, by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]].

    Matrix products instead of a triangular solve against the identity: about twice as fast at 1536.
    """
    n = L.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    inv = torch.zeros_like(L)
    inv[:h, :h] = _lower_triangular_inverse(L[:h, :h], leaf)
    inv[h:, h:] = _lower_triangular_inverse(L[h:, h:], leaf)
    inv[h:, :h] = -(inv[h:, h:] @ L[h:, :h]) @ inv[:h, :h]
    return inv


def _choose_nm(
    w: torch.Tensor, d2: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor | None, n_prune: int
) -> None:
    """Mark the `n_prune` lowest w^2/d^2 of one N:M group as pruned (1.0), in place.

    All arguments are the group's rows of the transposed block: `w` and the float 0/1 `pruned`
    (M, rows), `d2` the (M, 1) [H^-1]_cc^2, `keep` the (M, rows) preserve mask or None.
    """
    scores = preserved(w.square().div_(d2), keep)
    pruned.scatter_(0, torch.topk(scores, n_prune, dim=0, largest=False).indices, 1.0)
    if keep is not None:
        pruned.masked_fill_(~keep, 1.0)  # more than M - N already pruned: all stay pruned


def prune_sparsegpt(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    dead: torch.Tensor,
    sparsity: float,
    structure: Structure = UNSTRUCTURED,
    block_size: int = 128,
    preserve_mask: torch.Tensor | None = None,
    row_groups: Sequence[tuple[int, float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> (pruned and updated weight in weight's dtype, keep mask), given `inverse_hessian`'s output.

    Unstructured: each column block prunes exactly round(numel_block * sparsity) weights of smallest
    w^2 / [H^-1]_cc^2. N:M: every M columns, the M - N smallest of that score, from the weights as
    already updated by earlier columns. Weights with `preserve_mask` False are always pruned.

    `row_groups` [(rows, sparsity), ...] solves several layers that share H stacked by rows (q/k/v,
    gate/up) in one pass: rows never interact, only the unstructured count is taken per group.
    """
    if row_groups is None:
        row_groups = [(weight.shape[0], sparsity)]
    if sum(n for n, _ in row_groups) != weight.shape[0]:
        raise ValueError(f"row_groups {list(row_groups)} do not add up to the weight's {weight.shape[0]} rows")
    for _, s in row_groups:
        check_sparsity(s)
    bounds = list(accumulate([0] + [n for n, _ in row_groups]))
    spans = [(a, b, s) for a, b, (_, s) in zip(bounds, bounds[1:], row_groups)]
    rows, cols = weight.shape
    if hinv.shape != (cols, cols) or dead.shape != (cols,):
        raise ValueError(
            f"hinv {tuple(hinv.shape)} / dead {tuple(dead.shape)} do not match a weight with {cols} inputs; "
            "pass inverse_hessian() of this layer's input Hessian"
        )
    if block_size < 1:
        raise ValueError(f"block_size {block_size} must be a positive number of columns, e.g. 128")
    if structure.is_nm:
        structure.check_columns(cols)
        if block_size % structure.m:
            raise ValueError(f"block_size {block_size} must be a multiple of M={structure.m} for {structure}")
    if preserve_mask is not None and preserve_mask.shape != weight.shape:
        raise ValueError(f"preserve_mask has shape {tuple(preserve_mask.shape)} but the weight has {(rows, cols)}")

    W = weight.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    W[:, dead] = 0
    keep = torch.ones_like(W, dtype=torch.bool)
    nm, m, n_prune = structure.is_nm, structure.m, structure.m - structure.n
    sub = m * max(1, SUB_BLOCK // m) if nm else SUB_BLOCK
    # The pruned set is held as float 0/1: on CPUs, arithmetic on bool tensors (a bool / float
    # division, conversion from bool, masked_fill) takes slow paths, and the per-block work adds up.
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # The block is held transposed, (count, rows), so each step reads one contiguous column.
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1).unsqueeze(1)  # (count, 1), to scale rows of the transposed block
        keep_block = None if preserve_mask is None else preserve_mask[:, i1:i2].t()
        if nm:
            pruned = torch.zeros_like(W1)
        else:
            # over the whole block, by count: ties (dead columns) never over-prune
            scores = preserved(W1.square().div_(d.square()), keep_block)
            prune = torch.cat([~topk_keep_mask(scores[:, a:b], s) for a, b, s in spans], dim=1)
            if keep_block is not None:
                prune |= ~keep_block
            pruned = float_mask(prune)
        # err_i = (w_i - q_i) / [H^-1]_ii with q_i = 0 where pruned and w_i where kept: err_i = w_i * scale_i.
        scale = pruned / d
        d2 = d.square() if nm else None
        count = i2 - i1
        # Row and group views made once per block: indexing costs more than the small products of each step.
        w_rows, err_rows, scale_rows, hinv_rows = W1.unbind(0), Err1.unbind(0), scale.unbind(0), Hinv1.unbind(0)
        if nm:  # count is a multiple of M (M divides both the block size and the columns)
            w_g, pruned_g, scale_g = (t.view(-1, m, rows).unbind(0) for t in (W1, pruned, scale))
            d_g, d2_g = d.view(-1, m, 1).unbind(0), d2.view(-1, m, 1).unbind(0)
        for j1 in range(0, count, sub):
            j2 = min(j1 + sub, count)
            for i in range(j1, j2):
                if nm and i % m == 0:
                    g = i // m
                    keep_g = None if keep_block is None else keep_block[i : i + m]
                    _choose_nm(w_g[g], d2_g[g], pruned_g[g], keep_g, n_prune)
                    torch.div(pruned_g[g], d_g[g], out=scale_g[g])
                err = torch.mul(w_rows[i], scale_rows[i], out=err_rows[i])
                # OBS update of the rest of the sub-block; column i itself needs none: a pruned one is
                # zeroed below, a kept one has err_i = 0.
                W1[i + 1 : j2].addr_(hinv_rows[i][i + 1 : j2], err, alpha=-1.0)
            # The same updates for the rest of the block, as one product (exact: they are linear in Err1).
            W1[j2:].addmm_(Hinv1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1.0)
        # Exact zeros where pruned: w * 0 is -0.0 for a negative w, and -0.0 + 0.0 is +0.0.
        W[:, i1:i2] = W1.mul_(1.0 - pruned).add_(0.0).t()
        W[:, i2:].addmm_(Err1.t(), hinv[i1:i2, i2:], alpha=-1.0)  # lazy update of later blocks
        keep[:, i1:i2] = ~pruned.bool().t()
    return W.to(weight.dtype), keep


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    structure: Structure = UNSTRUCTURED,
    block_size: int = 128,
    damp: float = 0.01,
    preserve_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer in one call: `inverse_hessian` then `prune_sparsegpt`."""
    hinv, dead = inverse_hessian(hessian, damp)
    return prune_sparsegpt(weight, hinv, dead, sparsity, structure, block_size, preserve_mask)
