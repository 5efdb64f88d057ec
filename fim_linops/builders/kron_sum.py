r"""Kronecker-sum builder: per layer (per group), the nearest sum of r Kronecker products to the exact
block F = 1/N sum_{n,k} vec(M_nk) vec(M_nk)^T in Frobenius norm (Van Loan & Pitsianis 1993).

With the rearrangement R(F)[(a, b), (c, d)] = F[(a, c), (b, d)] (rows^2 x cols^2),
||F - sum_s L_s kron R_s||_F = ||R(F) - sum_s vec(L_s) vec(R_s)^T||_F, so the best r-term sum is the
truncated SVD of R(F). R(F) is never formed: it acts on a (cols x cols) matrix X and its adjoint on a
(rows x rows) matrix Y as

    R(F) X = 1/N sum_{n,k} M_nk X M_nk^T,     R(F)^T Y = 1/N sum_{n,k} M_nk^T Y M_nk,

one data pass each (per-example M in memory-bounded chunks; for a Linear layer with one position
M = g [a; 1]^T and both reduce to weighted sums over examples). R(F) maps symmetric to symmetric and
antisymmetric to antisymmetric matrices, so the terms are symmetric pairs (the leading one PSD) or
antisymmetric pairs (whose Kronecker product is symmetric). A block subspace iteration (r + 2
iterates) with Rayleigh-Ritz converges to the top-r singular triplets; it
stops when every Ritz residual ||R(F) v - sigma u|| <= tol sigma_1, or, once within 100 tol, when
the worst residual has not fallen by 10% in 5 iterations (the precision floor of float32 passes).
When the block is exactly a sum of r Kronecker products R(F) has rank r and the first iteration is
exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from fim_linops.builders.base import BuildContext, RecordingContext, kron_spec, register
from fim_linops.builders.convergence import Stagnation
from fim_linops.builders.lowrank import check_rank
from fim_linops.distributed import all_reduce_, all_reduce_count
from fim_linops.engine import BatchResult, Engine, FisherType
from fim_linops.engine.rules.linear import LinearRule, with_ones
from fim_linops.operators.kron import KronSpec
from fim_linops.operators.kron_sum import KronSum
from fim_linops.structures import Structure

OVERSAMPLE = 2
MAX_ITER = 100
#: iterations (two data passes each) without a 10% fall of the worst residual before stopping
STALL_ITERS = 5


def kron_specs(engine: Engine) -> list[KronSpec]:
    return [kron_spec(rb) for rb in engine.ruled]


def _apply(res: BatchResult, i: int, spec: KronSpec, x: Tensor, adjoint: bool) -> Tensor:
    """sum_{n,k} M X M^T (or M^T Y M with ``adjoint``) over one batch, for x (j, groups, d, d).

    Index convention: j iterate, k column, n example, g group, a/b rows of M, c/d columns of M."""
    rb = res.engine.ruled[i]
    calls = res.calls.get(i, [])
    if len(calls) == 1 and isinstance(rb.rule, LinearRule) and calls[0][0].ndim == 2:
        a, g = calls[0]
        ab = with_ones(a, spec.has_weight and spec.w_cols > 0, spec.has_bias)  # (n, c)
        if not adjoint:  # M X M^T = (a^T X a) g g^T
            w = torch.einsum("nc,jcd,nd->jn", ab, x[:, 0], ab)
            return torch.einsum("jn,kna,knb->jab", w, g, g)[:, None]
        w = torch.einsum("kna,jab,knb->jn", g, x[:, 0], g)
        return torch.einsum("jn,nc,nd->jcd", w, ab, ab)[:, None]
    p = spec.stop - spec.start
    out = None
    for lo, hi in res.chunks(p):
        gr = res.block_grads(i, lo, hi).reshape(-1, p)  # (k*n, p): row m = (k, n)
        # rows in slices: each einsum's (s, j, p) intermediate stays small beside the (K, n, p)
        # gradients, which the column chunk counts once
        starts = res.slices(gr.shape[0], p * (x.shape[0] + 1))
        for r0 in starts:
            m = spec.to_mat(gr[r0 : r0 + starts.step].T)  # (s, g, rows, cols)
            if adjoint:
                part = torch.einsum("mgac,jgab,mgbd->jgcd", m, x, m)
            else:
                part = torch.einsum("mgac,jgcd,mgbd->jgab", m, x, m)
            out = part if out is None else out + part
        del gr
    assert out is not None  # a batch has at least one example
    return out


def _orth(x: Tensor) -> Tensor:
    """Frobenius-orthonormalise the j matrices of x (j, g, d, d) per group."""
    j, g, d, _ = x.shape
    q = torch.linalg.qr(x.permute(1, 2, 3, 0).reshape(g, d * d, j))[0]
    return q.reshape(g, d, d, j).permute(3, 0, 1, 2)


@register(Structure.KRON_SUM)
def build_kron_sum(ctx: BuildContext) -> KronSum:
    engine = ctx.engine
    columns: list[Tensor] | None = [] if engine.fisher_type is FisherType.MC else None
    recording = RecordingContext.of(ctx, columns)

    def passes(first: bool) -> Iterable[BatchResult]:
        return recording.results() if first else ctx.results(columns=columns)

    return kron_sum_over(ctx, engine, passes)


def kron_sum_over(
    ctx: BuildContext, engine: Engine, passes: Callable[[bool], Iterable[BatchResult]]
) -> KronSum:
    """The Kronecker sums of ``engine``'s ruled layers; ``passes(first)`` runs one data pass (the
    first one draws the MC columns, the later ones reuse them)."""
    specs = kron_specs(engine)
    r = check_rank(ctx.rank, engine.layout.numel, "structure='kron_sum'")
    dt, dev = ctx.dtype, ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)
    width = [min(r + OVERSAMPLE, s.rows**2, s.cols**2) for s in specs]

    first = [True]

    def apply_all(xs: list[Tensor], adjoint: bool) -> list[Tensor]:
        """One data pass: R(F) (or R(F)^T) on every block's iterates."""
        out: list[Tensor | None] = [None] * len(specs)
        n = 0
        src = passes(first[0])
        first[0] = False
        for res in src:
            for i, spec in enumerate(specs):
                if res.calls.get(i):
                    part = _apply(res, i, spec, xs[i], adjoint)
                    prev = out[i]
                    out[i] = part if prev is None else prev + part
            n += res.count
            del res  # release this batch before the engine makes the next
        d = [(s.cols if adjoint else s.rows) for s in specs]
        sums = [
            torch.zeros(x.shape[0], s.groups, di, di, dtype=dt, device=dev) if o is None else o
            for o, x, s, di in zip(out, xs, specs, d, strict=True)
        ]
        # torch.distributed: each rank passed its shard; every pass is a sum over all the data
        all_reduce_(sums, ctx.group)
        n = all_reduce_count(n, ctx.group, dev)
        return [o / max(n, 1) for o in sums]

    qx = []
    for s, b in zip(specs, width, strict=True):
        x0 = torch.randn(b, s.groups, s.cols, s.cols, dtype=dt, device=dev, generator=gen)
        qx.append(_orth(x0))
    y = apply_all(qx, adjoint=False)
    tol = 1e-11 if dt == torch.float64 else 1e-5
    prev = None
    stagnation = Stagnation(tol, patience=STALL_ITERS)
    for _ in range(MAX_ITER):
        if prev is not None:
            worst = 0.0
            for yi, (qy_i, u, sv, v) in zip(y, prev, strict=True):
                # Ritz residual R(F) v_s - sigma_s u_s, s < r (j iterate, s triplet, g group)
                lhs = torch.einsum("jgab,gjs->sgab", yi, v)
                rhs = torch.einsum("jgab,gjs->sgab", qy_i, u) * sv.T[:, :, None, None]
                res_norm = (lhs - rhs)[:r].flatten(2).norm(dim=-1)
                rel = res_norm / sv[:, :1].T.clamp_min(torch.finfo(dt).tiny)
                worst = max(worst, float(rel.max()))
            if worst <= tol:
                break
            if stagnation.stalled(worst):  # the precision floor of float32 passes
                break
        qy = [_orth(yi) for yi in y]
        z = apply_all(qy, adjoint=True)
        qx = [_orth(zi) for zi in z]
        prev = []
        for qyi, zi, qxi in zip(qy, z, qx, strict=True):
            c = torch.einsum("jgcd,lgcd->gjl", zi, qxi)  # C[g, j, l] = <Q_Y j, R(F) Q_X l>
            u, sv, vh = torch.linalg.svd(c)
            prev.append((qyi, u, sv, vh.transpose(-1, -2)))
        y = apply_all(qx, adjoint=False)
    else:
        warnings.warn(
            f"kron_sum: the subspace iteration did not reach tol={tol} in {MAX_ITER} iterations; "
            "the Kronecker terms are approximate (close singular values at the cut: another "
            "rank=, or dtype=torch.float64, converges)",
            stacklevel=2,
        )
    factors: list[Tensor] = []
    for yi, qxi, (_, _, _, v), b in zip(y, qx, prev, width, strict=True):
        k = min(r, b)
        left = torch.einsum("jgab,gjs->sgab", yi, v[:, :, :k])  # sigma_s L_s = R(F) v_s
        right = torch.einsum("jgcd,gjs->sgcd", qxi, v[:, :, :k])
        # (-L) kron (-R) = L kron R: make the leading term's right factor positive
        sign = torch.where(right[0].diagonal(dim1=-2, dim2=-1).sum(-1) < 0, -1.0, 1.0).to(dt)[
            None, :, None, None
        ]
        sign = (
            torch.cat([sign, torch.ones(k - 1, *sign.shape[1:], dtype=dt, device=dev)])
            if k > 1
            else sign
        )
        left, right = left * sign, right * sign
        factors += [left, right]
    return KronSum(*factors, specs=tuple(specs))
