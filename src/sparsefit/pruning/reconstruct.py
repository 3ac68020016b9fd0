"""Least-squares weight reconstruction for a fixed mask: the problem of Boža 2024, "Fast and
Effective Weight Update for Pruned Large Language Models" (solved there by ADMM, here by CG).

Once a mask is chosen, the best weights for it solve, row by row, the layer-wise problem

    min_{W'}  tr((W - W') H (W - W')^T)   with W'_ij = 0 wherever the mask prunes,

i.e. H_KK w'_K = (H w)_K on each row's kept inputs K. SparseGPT only approximates this: its OBS
updates reach the columns right of each pruned one, never those already passed. Wanda does not
update weights at all. We solve it with preconditioned conjugate gradient on the kept weights of
all rows at once (one (rows, in) x (in, in) product per step), started from the method's weights.
H is dampened as SparseGPT dampens it, which also pulls the kept weights towards their dense
values where the data is silent.

The preconditioner. Activations of LLMs have a few outlier directions, so H = D^1/2 C D^1/2
(D = diag H) has a correlation matrix C with a handful of eigenvalues far above 1 (70-170 at
576 inputs of SmolLM2) and the rest near it: diag(H) alone leaves those few directions badly
conditioned. We approximate C ~ I + U S U^T from its top `rank` eigenpairs (S = lambda - 1) and
invert, for each row, the restriction of that approximation to the row's kept inputs exactly, by
the Woodbury identity: a (rank x rank) system per row. On SmolLM2's Hessians at 2:4, 5 steps then
reach what 10 steps of the diagonal preconditioner did, for a slightly dearer step and a setup of
about one step (benchmarks/reconstruct_error.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparsefit.pruning.structure import float_mask

OVERSAMPLE = 8  # extra subspace vectors: the top `rank` Ritz pairs converge in two power steps
POWER_STEPS = 2


def reconstruct(
    weight: torch.Tensor,
    pruned: torch.Tensor,
    keep: torch.Tensor,
    hessian: torch.Tensor,
    iters: int = 20,
    damp: float = 0.01,
    rank: int = 16,
) -> torch.Tensor:
    """Dense `weight` (out, in), the method's `pruned` weight and bool `keep` mask, H (in, in) ->
    weights for that mask that reconstruct `weight`'s outputs better; exact zeros where `keep` is False.

    `rank` is the number of outlier directions of H the preconditioner captures; 0 is plain diag(H).
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
    if rank < 0:
        raise ValueError(f"rank {rank} must be >= 0 (0: diagonal preconditioner)")
    # The dampened H + lam I is applied as H x + lam x, never formed: a copy of H would be the largest
    # buffer of the refit (784 MiB at 14336 inputs).
    H = hessian.detach().float()  # no copy when it is float32 already
    live = torch.diag(H) != 0
    lam = damp * float(H.diagonal().mean())
    mask = float_mask(keep)
    X = pruned.detach().to(torch.float32, copy=True) * mask
    if iters == 0:
        return X.to(weight.dtype)
    # Residual of the normal equations on the kept weights: ((W - X) (H + lam I)) restricted to the mask.
    D = weight.detach().float() * live - X
    R = torch.mm(D, H).add_(D, alpha=lam).mul_(mask)
    del D
    precondition = low_rank_preconditioner(H, mask, rank, lam)
    Z, AP = torch.empty_like(R), torch.empty_like(R)
    P = precondition(R, Z).clone()
    rz = torch.linalg.vecdot(R, Z).unsqueeze(1)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iters):
        torch.mm(P, H, out=AP).add_(P, alpha=lam).mul_(mask)
        # Rows already solved have rz = 0 and P = 0: their step is 0, not 0/0.
        alpha = rz / torch.linalg.vecdot(P, AP).unsqueeze(1).clamp_min(tiny)
        X.addcmul_(alpha, P)
        R.addcmul_(alpha, AP, value=-1.0)
        precondition(R, Z)
        rz_next = torch.linalg.vecdot(R, Z).unsqueeze(1)
        torch.addcmul(Z, rz_next / rz.clamp_min(tiny), P, out=P)  # P = Z + beta P
        rz = rz_next
    return X.mul_(mask).to(weight.dtype)


def low_rank_preconditioner(
    H: torch.Tensor, mask: torch.Tensor, rank: int, shift: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """For a positive definite H (in, in) and a 0/1 float `mask` (rows, in): `apply(R, out)` writes,
    row by row, M_KK^-1 r_K into `out` (zeros off the mask), where M = D^1/2 (I + U S U^T) D^1/2
    keeps the top `rank` eigenpairs (lambda, u) of C = D^-1/2 H D^-1/2 with lambda > 1, S = lambda - 1.

    With r~ = D_K^-1/2 r_K, Woodbury gives M_KK^-1 r_K = D_K^-1/2 (r~ - U_K G^-1 U_K^T r~),
    G = S^-1 + U_K^T U_K, a different small G for each row. With `shift`, all of this for H + shift I.
    """
    inv_diag = 1.0 / (H.diagonal() + shift)
    inv_sqrt = inv_diag.sqrt()
    # C = D^-1/2 H D^-1/2 is applied as scalings around H, never formed: a second in x in buffer
    # (822 MB at 14336 inputs) would be most of the refit's memory.
    eigvals, U = _top_eigenpairs(H, rank, inv_sqrt, shift)
    outlier = eigvals > 1.0
    eigvals, U = eigvals[outlier], U[:, outlier]
    if not len(eigvals):

        def apply_diagonal(R: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return torch.mul(R, inv_diag, out=out)

        return apply_diagonal
    k = len(eigvals)
    V = U * inv_sqrt[:, None]  # D^-1/2 U: (in, k)
    gram = (mask @ (U[:, :, None] * U[:, None, :]).reshape(-1, k * k)).view(-1, k, k)  # U_K^T U_K per row
    gram.diagonal(dim1=1, dim2=2).add_(1.0 / (eigvals - 1.0))
    g_inv = torch.linalg.inv(gram)

    def apply(R: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        coeff = torch.bmm(g_inv, (R @ V).unsqueeze(2)).squeeze(2)  # G^-1 U_K^T r~ per row: (rows, k)
        # D^-1 r - V coeff, restricted to the mask (R is zero off it); the product subtracts in place.
        return torch.mul(R, inv_diag, out=out).addmm_(coeff, V.t(), alpha=-1.0).mul_(mask)

    return apply


def _top_eigenpairs(
    C: torch.Tensor, rank: int, scale: torch.Tensor | None = None, shift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` largest eigenvalues (ascending) of symmetric C (with `scale`: of diag(scale)
    (C + shift I) diag(scale)) with orthonormal eigenvectors as columns.

    By subspace iteration from a fixed random start (deterministic) and Rayleigh-Ritz; a full
    `eigh` when the subspace would be most of C.
    """
    n = C.shape[0]
    rank = min(rank, n)
    if rank == 0:
        return C.new_zeros(0), C.new_zeros(n, 0)

    def apply(Q: torch.Tensor) -> torch.Tensor:
        if scale is None:
            return C @ Q
        scaled = scale[:, None] * Q
        return scale[:, None] * (C @ scaled + shift * scaled)

    width = rank + OVERSAMPLE
    if 2 * width >= n:
        full = C if scale is None else C + shift * torch.eye(n, dtype=C.dtype, device=C.device)
        if scale is not None:
            full = full * scale[:, None] * scale[None, :]
        eigvals, vectors = torch.linalg.eigh(full)
        return eigvals[n - rank :], vectors[:, n - rank :]
    # Drawn on the CPU whatever C's device: a CUDA generator gives other numbers for the same seed,
    # and with a few CG steps the refit depends on the start (a GPU refit differed by 1e-3 before).
    Q = torch.randn(n, width, generator=torch.Generator().manual_seed(0), dtype=C.dtype).to(C.device)
    for _ in range(POWER_STEPS):
        Q = torch.linalg.qr(apply(Q)).Q
    eigvals, ritz = torch.linalg.eigh(Q.t() @ apply(Q))
    return eigvals[-rank:], Q @ ritz[:, -rank:]
