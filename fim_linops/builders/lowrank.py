r"""Low-rank builder: the top-k eigenpairs of the exact Fisher.

F = 1/N Jt^T Jt with Jt (N K, P) the stacked per-example gradients of the K back-propagated
columns (the square-root Jacobian). Two routes:

* small N K (Jt fits in ``SVD_MAX_BYTES``): one pass collects Jt, and the thin SVD
  Jt / sqrt(N) = W S V^T gives F = V S^2 V^T exactly: U = V[:, :k], lambda = S[:k]^2;
* otherwise: Lanczos with full reorthogonalisation and thick restarts on exact implicit
  products F q (one data pass, one forward-mode forward and one backward per product), with
  Rayleigh-Ritz on the Krylov basis, until every Ritz residual ||F u - lambda u|| <= tol *
  lambda_max.

Across processes (torch.distributed) every rank reads its shard. SVD route: each rank reduces its
Jt_r to R_r = S_r V_r^T (min(N_r K, P) rows, Jt_r^T Jt_r = R_r^T R_r), the R_r of all ranks are
gathered and stacked, and the thin SVD of R / sqrt(N) gives F exactly; the route is taken only
when every rank's Jt fits. Lanczos route: every product F q is all-reduced (the implicit
operator's products) and the start block is rank 0's, so every rank runs the same iteration.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from fim_linops.builders.base import BuildContext, register
from fim_linops.builders.convergence import Stagnation
from fim_linops.builders.core import implicit_operator
from fim_linops.distributed import all_gather_rows, all_reduce_count, any_rank, broadcast_
from fim_linops.operators.lowrank import LowRank
from fim_linops.statistics import form_all_blocks
from fim_linops.structures import Structure

#: largest stacked per-example gradient matrix Jt (bytes) taken through the exact SVD route
SVD_MAX_BYTES = 1 << 28


def check_rank(rank: object, p: int, what: str = "structure='lowrank'") -> int:
    """Validate ``rank`` against the number of parameters P."""
    if rank is None:
        raise ValueError(f"{what} needs rank=k, the number of eigenpairs (or terms) to keep")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank > p:
        raise ValueError(
            f"rank={rank} exceeds the number of parameters P={p}; use rank <= {p} "
            "(or structure='dense' for the full matrix)"
        )
    return rank


def _stacked_gradients(ctx: BuildContext) -> tuple[Tensor, int] | None:
    """Jt (N K, P) and N, or None when Jt would exceed SVD_MAX_BYTES."""
    p = ctx.engine.layout.numel
    rows: list[Tensor] = []
    nbytes = 0
    n = 0
    form_all_blocks(ctx.engine)  # the column chunks count the (K, n, P) rows made at once
    results = ctx.results()
    try:
        for res in results:
            for lo, hi in res.chunks(p, func=True):
                g = torch.cat(res.all_block_grads(lo, hi), dim=-1).reshape(-1, p)
                nbytes += g.numel() * g.element_size()
                if nbytes > SVD_MAX_BYTES:
                    return None
                rows.append(g)
            n += res.count
            del res  # release this batch before the engine makes the next
    finally:
        results.close()  # removes the hooks at once when the route is abandoned
    return torch.cat(rows), n


def _orthonormal_block(z: Tensor, basis: Tensor | None) -> Tensor:
    """An orthonormal basis of z with the span of ``basis`` (orthonormal columns) projected out
    (classical Gram-Schmidt twice, then QR twice: stable also when z nearly lies in the span)."""
    for _ in range(2):
        if basis is not None:
            z = z - basis @ (basis.T @ z)
        z = torch.linalg.qr(z)[0]
    return z


def top_eigenpairs(
    matmul: Callable[[Tensor], Tensor],
    p: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    oversample: int = 10,
    tol: float | None = None,
    max_iter: int = 2000,
    generator: torch.Generator | None = None,
    block: int = 1,
    group: object = None,
) -> tuple[Tensor, Tensor]:
    r"""Top-k eigenpairs (U (P, k), lambda (k,) descending) of a symmetric PSD operator given by
    ``matmul`` (P, M) -> (P, M), by (block) Lanczos with full reorthogonalisation and thick
    restarts (Wu & Simon 2000; Golub & Underwood 1977 for blocks).

    Each step multiplies the newest direction(s) (``block`` columns: the last product,
    orthogonalised against the basis V) and appends them to V (P, s); Rayleigh-Ritz on V uses the
    stored products Z = F V, so T = V^T Z and the residuals ||Z w - V w lambda|| are exact without
    extra products. When s would pass 2k + ``oversample`` (at least 20), V and Z restart from the
    top k + ``oversample`` / 2 Ritz vectors (no product needed: F V w = Z w). Stops when every
    one of the top k residuals is <= tol * lambda_max, when they are within 100 tol and have not
    fallen by 10% in 2 (2k + oversample) columns (the precision floor of the products), or
    after ``max_iter`` product columns (with a warning).
    One column per step by default: an implicit product of one column runs forward-mode AD in a
    single pass, and single-vector Krylov methods need the fewest columns in all. Like ARPACK's
    eigsh, one column per step cannot separate an exactly repeated eigenvalue (its Krylov space
    holds one vector of each eigenspace): ``block=b`` finds multiplicities up to b.
    ``group``: a torch.distributed process group over which ``matmul`` is reduced; the start
    block is then rank 0's, so that every rank runs the same iteration."""
    tol = tol if tol is not None else (1e-10 if dtype == torch.float64 else 1e-5)
    block = max(1, block)
    keep = k + oversample // 2
    max_dim = min(p, max(2 * k + oversample, 20, keep + 3 * block))
    block = min(block, max(1, max_dim - k))
    keep = min(max_dim - block, keep)
    basis = torch.zeros(p, 0, dtype=dtype, device=device)
    prods = torch.zeros(p, 0, dtype=dtype, device=device)
    start = torch.randn(p, block, dtype=dtype, device=device, generator=generator)
    d = _orthonormal_block(broadcast_(start, group), None)
    ritz, lam, columns = basis, basis.new_zeros(0), 0
    stagnation = Stagnation(tol, patience=2 * max_dim)  # counted in product columns
    while columns < max_iter:
        z = matmul(d)  # F d, (P, b)
        columns += d.shape[1]
        basis, prods = torch.cat([basis, d], dim=1), torch.cat([prods, z], dim=1)
        t = basis.T @ prods
        evals, w = torch.linalg.eigh((t + t.T) / 2)  # ascending
        evals, w = evals.flip(0), w.flip(1)
        top = w[:, :k]
        ritz, lam = basis @ top, evals[:k]
        resid = torch.linalg.vector_norm(prods @ top - ritz * lam, dim=0)
        scale = evals[0].abs().clamp_min(torch.finfo(dtype).tiny)
        if lam.shape[0] == k:
            worst = float((resid / scale).max())
            if worst <= tol:
                return ritz, lam.clamp_min(0)
            if stagnation.stalled(worst, steps=d.shape[1]):  # the products' precision floor
                return ritz, lam.clamp_min(0)
        # the Krylov continuation: the newest product orthogonalised against the whole basis
        # (in exact arithmetic the direction of every Ritz residual), taken before a restart
        d = _orthonormal_block(z, basis)
        if basis.shape[1] + block > max_dim:  # thick restart from the top Ritz vectors
            basis, prods = basis @ w[:, :keep], prods @ w[:, :keep]
            d = _orthonormal_block(d, basis)
    warnings.warn(
        f"lowrank: Lanczos did not reach tol={tol} in {max_iter} product columns "
        "(close eigenvalues near rank k); the eigenpairs are approximate. A rank= that does not "
        "cut through a cluster of close eigenvalues, or dtype=torch.float64, converges",
        stacklevel=2,
    )
    return ritz, lam.clamp_min(0)


@register(Structure.LOWRANK)
def build_lowrank(ctx: BuildContext) -> LowRank:
    p = ctx.engine.layout.numel
    k = check_rank(ctx.rank, p)
    stacked = _stacked_gradients(ctx)
    if not any_rank(stacked is None, ctx.group, ctx.device):
        assert stacked is not None
        jt, n = stacked
        if ctx.group is not None:  # R_r = S_r V_r^T per rank: R^T R = sum_r Jt_r^T Jt_r
            _, s_r, vh_r = torch.linalg.svd(jt, full_matrices=False)
            jt = all_gather_rows(s_r[:, None] * vh_r, ctx.group)
            n = all_reduce_count(n, ctx.group, ctx.device)
        _, s, vh = torch.linalg.svd(jt / max(n, 1) ** 0.5, full_matrices=False)
        k_eff = min(k, s.shape[0])  # rank(F) <= N K: the remaining eigenvalues are zero
        return LowRank(vh[:k_eff].T.contiguous(), s[:k_eff] ** 2)
    op = implicit_operator(ctx.engine, ctx.data, ctx.device, ctx.dtype, ctx.group)
    u, lam = top_eigenpairs(op._matmul, p, k, ctx.dtype, ctx.device, group=ctx.group)
    return LowRank(u, lam)
