"""Least-squares weight reconstruction for a fixed mask: the problem of Boža 2024, "Fast and
Effective Weight Update for Pruned Large Language Models" (solved there by ADMM, here by CG).

Once a mask is chosen, the best weights for it solve, row by row, the layer-wise problem

    min_{W'}  tr((W - W') H (W - W')^T)   with W'_ij = 0 wherever the mask prunes,

i.e. H_KK w'_K = (H w)_K on each row's kept inputs K. SparseGPT only approximates this: its OBS
updates reach the columns right of each pruned one, never those already passed. Wanda does not
update weights at all. We solve it with conjugate gradient on the kept weights of all rows at
once (one (rows, in) x (in, in) product per step), preconditioned by diag(H) and started from the
method's weights, so a few tens of steps reach the exact solution. H is dampened as SparseGPT
dampens it, which also pulls the kept weights towards their dense values where the data is silent.
"""

from __future__ import annotations

import torch


def reconstruct(
    weight: torch.Tensor,
    pruned: torch.Tensor,
    keep: torch.Tensor,
    hessian: torch.Tensor,
    iters: int = 20,
    damp: float = 0.01,
) -> torch.Tensor:
    """Dense `weight` (out, in), the method's `pruned` weight and bool `keep` mask, H (in, in) ->
    weights for that mask that reconstruct `weight`'s outputs better; exact zeros where `keep` is False.

    Inputs that never fired (H_jj = 0) carry no signal, so the target treats their weights as zero.
    """
    if weight.shape != pruned.shape or keep.shape != weight.shape:
        raise ValueError(
            f"weight {tuple(weight.shape)}, pruned {tuple(pruned.shape)} and keep {tuple(keep.shape)} must match"
        )
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match a weight with {cols} inputs")
    if iters < 0:
        raise ValueError(f"iters {iters} must be >= 0")
    if damp <= 0:
        raise ValueError(f"damp {damp} must be positive, e.g. 0.01")
    H = hessian.detach().to(torch.float32, copy=True)
    live = torch.diag(H) != 0
    H.diagonal().add_(damp * H.diagonal().mean())
    mask = keep.to(torch.float32)
    X = pruned.detach().to(torch.float32, copy=True) * mask
    # Residual of the normal equations on the kept weights: ((W - X) H) restricted to the mask.
    R = ((weight.detach().float() * live - X) @ H) * mask
    inv_diag = 1.0 / H.diagonal()
    Z = R * inv_diag
    P = Z.clone()
    rz = (R * Z).sum(1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iters):
        AP = (P @ H) * mask
        # Rows already solved have rz = 0 and P = 0: their step is 0, not 0/0.
        alpha = rz / (P * AP).sum(1, keepdim=True).clamp_min(tiny)
        X.addcmul_(alpha, P)
        R.addcmul_(alpha, AP, value=-1.0)
        torch.mul(R, inv_diag, out=Z)
        rz_next = (R * Z).sum(1, keepdim=True)
        P = Z + (rz_next / rz.clamp_min(tiny)) * P
        rz = rz_next
    return X.mul_(mask).to(weight.dtype)
