"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"), following IST-DASLab's `sparsegpt.py` (`add_batch` / `fasterprune`).

The statistics are H = 2 X X^T / n; the solver prunes column blocks left to right. Inside a
block each pruned weight's error is propagated to the remaining columns of the block through
the Cholesky factor of H^-1 (the OBS update, Eq. 3 of the paper); the columns right of the
block receive the block's accumulated error at once (the "lazy batch" update).
"""

from __future__ import annotations

import torch

from sparsefit.pruning.structure import UNSTRUCTURED, Structure, check_sparsity, preserved


def inverse_hessian(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """H (cols, cols) -> (upper Cholesky factor of (H + damp * mean(diag H) I)^-1, dead-input mask).

    Inputs that never fired (H_jj = 0) get H_jj = 1 so the factorization exists; their weights
    are zeroed by the solver since they never influenced the output.
    """
    H = hessian.detach().float().clone()
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


def prune_sparsegpt(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    dead: torch.Tensor,
    sparsity: float,
    structure: Structure = UNSTRUCTURED,
    block_size: int = 128,
    preserve_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> (pruned and updated weight, keep mask), given `inverse_hessian`'s output.

    Unstructured: each column block prunes exactly round(numel * sparsity) weights of smallest
    w^2 / [H^-1]_cc^2. N:M: every M columns, the M - N smallest of that score, from the weights
    as already updated by earlier columns. Weights with `preserve_mask` False are always pruned.
    """
    check_sparsity(sparsity)
    W = weight.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # (rows, cols)
    rows, cols = W.shape
    if structure.is_nm:
        structure.check_columns(cols)
    W[:, dead] = 0
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        # The block is held transposed, (count, rows), so each step reads one contiguous column.
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        keep_block = None if preserve_mask is None else preserve_mask[:, i1:i2].t()
        pruned = torch.zeros(W1.shape, dtype=torch.bool, device=W.device)
        if not structure.is_nm:
            scores = preserved(W1**2 / d.unsqueeze(1) ** 2, keep_block)
            k = round(scores.numel() * sparsity)
            if k:
                pruned.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = True
            if keep_block is not None:
                pruned |= ~keep_block
        # err_i = (w_i - q_i) / [H^-1]_ii with q_i = w_i where kept and 0 where pruned: w_i * scale_i.
        scale = pruned / d.unsqueeze(1)
        for i in range(count):
            if structure.is_nm and i % structure.m == 0:
                j = slice(i, i + structure.m)
                group_keep = None if keep_block is None else keep_block[j]
                scores = preserved(W1[j] ** 2 / d[j].unsqueeze(1) ** 2, group_keep)
                drop = torch.topk(scores, structure.m - structure.n, dim=0, largest=False).indices
                pruned[j].scatter_(0, drop, True)
                if group_keep is not None:
                    pruned[j] |= ~group_keep
                scale[j] = pruned[j] / d[j].unsqueeze(1)
            torch.mul(W1[i], scale[i], out=Err1[i])
            # OBS update of the rest of the block; it also turns column i into q_i (w_i - err_i d_i).
            W1[i:].addr_(Hinv1[i, i:], Err1[i], alpha=-1.0)
        W[:, i1:i2] = (W1 * ~pruned).t()  # exact zeros where pruned
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
