"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"), following IST-DASLab's `sparsegpt.py` (`add_batch` / `fasterprune`).

The statistics are H = 2 X X^T / n; the solver prunes column blocks left to right. Inside a
block each pruned weight's error is propagated to the remaining columns of the block through
the upper Cholesky factor of H^-1 (the OBS update, Eq. 3 of the paper); the columns right of the
block receive the block's accumulated error at once (the "lazy batch" update, Sec. 3.2).
The inversion is split from the solve so layers that share an input (q/k/v) invert H once.
"""

from __future__ import annotations

import torch

from sparsefit.pruning.structure import UNSTRUCTURED, Structure, check_sparsity, preserved


def inverse_hessian(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """H (cols, cols) -> (upper Cholesky factor of (H + damp * mean(diag H) I)^-1, dead-input bool (cols,)).

    `hessian` is not modified. Inputs that never fired (H_jj = 0) get H_jj = 1 so the factorization
    exists; the solver zeroes their weights since they never influenced the output.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"Hessian must be square (cols, cols), got shape {tuple(hessian.shape)}")
    if damp < 0:
        raise ValueError(f"damp {damp} is negative; use a small positive fraction such as 0.01")
    H = hessian.detach().to(torch.float32, copy=True)
    if not torch.isfinite(H).all():
        raise ValueError("Hessian has NaN/inf entries; check the calibration activations (e.g. fp16 overflow)")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        factor = torch.linalg.cholesky(H)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError(
            f"Hessian is not positive definite with damp={damp}; raise damp (e.g. 0.1) or use more calibration data"
        ) from None
    return hinv, dead


def _choose_nm(
    W1: torch.Tensor,
    d: torch.Tensor,
    pruned: torch.Tensor,
    keep_block: torch.Tensor | None,
    group: slice,
    n_prune: int,
) -> None:
    """Mark the `n_prune` lowest w^2/d^2 of one N:M group (rows of the transposed block) as pruned, in place."""
    group_keep = None if keep_block is None else keep_block[group]
    scores = preserved(W1[group] ** 2 / d[group].unsqueeze(1) ** 2, group_keep)
    pruned[group].scatter_(0, torch.topk(scores, n_prune, dim=0, largest=False).indices, True)
    if group_keep is not None:
        pruned[group] |= ~group_keep  # more than M - N already pruned: all stay pruned


def prune_sparsegpt(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    dead: torch.Tensor,
    sparsity: float,
    structure: Structure = UNSTRUCTURED,
    block_size: int = 128,
    preserve_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> (pruned and updated weight in weight's dtype, keep mask), given `inverse_hessian`'s output.

    Unstructured: each column block prunes exactly round(numel_block * sparsity) weights of smallest
    w^2 / [H^-1]_cc^2. N:M: every M columns, the M - N smallest of that score, from the weights as
    already updated by earlier columns. Weights with `preserve_mask` False are always pruned.
    """
    check_sparsity(sparsity)
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
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # The block is held transposed, (count, rows), so each step reads one contiguous column.
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        keep_block = None if preserve_mask is None else preserve_mask[:, i1:i2].t()
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if not nm:
            scores = preserved(W1**2 / d.unsqueeze(1) ** 2, keep_block)
            k = round(scores.numel() * sparsity)  # index-based: ties (dead columns) never over-prune
            if k:
                pruned.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = True
            if keep_block is not None:
                pruned |= ~keep_block
        # err_i = (w_i - q_i) / [H^-1]_ii with q_i = 0 where pruned and w_i where kept: err_i = w_i * scale_i.
        scale = pruned / d.unsqueeze(1)
        for i in range(i2 - i1):
            if nm and i % m == 0:
                group = slice(i, i + m)
                _choose_nm(W1, d, pruned, keep_block, group, n_prune)
                torch.div(pruned[group], d[group].unsqueeze(1), out=scale[group])
            err = torch.mul(W1[i], scale[i], out=Err1[i])
            # OBS update of the rest of the block; it also turns column i into q_i (up to rounding).
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
        W[:, i1:i2] = W1.masked_fill_(pruned, 0).t()  # exact zeros where pruned
        W[:, i2:].addmm_(Err1.t(), hinv[i1:i2, i2:], alpha=-1.0)  # lazy update of later blocks
        keep[:, i1:i2] = ~pruned.t()
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
