r"""Conjugate gradients for (P, P) SPD operators, batched over columns, with a relative tolerance
that really applies: stops when ||r_j|| <= tol ||b_j|| for every column j."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def conjugate_gradient(
    matmul: Callable[[Tensor], Tensor],
    b: Tensor,
    tol: float = 1e-10,
    max_iter: int | None = None,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Solve A x = b for b (P,) or (P, M); ``preconditioner(r)`` applies M^-1 r."""
    vector = b.ndim == 1
    bb = b[:, None] if vector else b
    p_dim = bb.shape[0]
    max_iter = max_iter or 10 * p_dim
    x = torch.zeros_like(bb)
    r = bb.clone()
    z = preconditioner(r) if preconditioner else r
    d = z.clone()
    rz = (r * z).sum(0)
    bnorm = bb.norm(dim=0).clamp_min(torch.finfo(bb.dtype).tiny)
    for _ in range(max_iter):
        if bool((r.norm(dim=0) <= tol * bnorm).all()):
            break
        ad = matmul(d)
        dad = (d * ad).sum(0)
        alpha = torch.where(dad > 0, rz / torch.where(dad > 0, dad, torch.ones_like(dad)), torch.zeros_like(dad))
        x = x + alpha * d
        r = r - alpha * ad
        z = preconditioner(r) if preconditioner else r
        rz_new = (r * z).sum(0)
        beta = torch.where(rz != 0, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        d = z + beta * d
        rz = rz_new
    return x[:, 0] if vector else x
