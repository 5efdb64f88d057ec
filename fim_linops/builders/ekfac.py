r"""EKFAC builder: two passes over the data.

Pass 1: the KFAC factors (Left, Right) per layer and their eigenbases Q_L, Q_R.
Pass 2: the refitted eigenvalues s = 1/N sum_{n,k} (Q_L^T M_{nk} Q_R)^2, M_{nk} the row-major
matrix view of the per-example gradient of column k. For Linear and Conv layers the projection is
done on a and g before they meet (M = sum_t g_t [a_t; 1]^T, so Q_L^T M Q_R = sum_t (Q_L^T g_t)
(Q_R^T [a_t; 1])^T); for one position per example the squares factorise and no per-example tensor
is formed at all. Other Kronecker layers (Embedding, shared modules) project their per-example
gradients, in memory-bounded (K, n) chunks. For ``fisher_type="mc"`` pass 2 reuses the labels
sampled in pass 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from fim_linops.builders import core  # noqa: F401  (the KFAC builder is registered first)
from fim_linops.builders.base import BUILDERS, BuildContext, RecordingContext, register
from fim_linops.engine import BatchResult, Engine, FisherType
from fim_linops.engine.rules.conv import ConvRule
from fim_linops.engine.rules.linear import LinearRule, with_ones
from fim_linops.operators import EKFAC, KFAC
from fim_linops.operators.base import sym_eigh
from fim_linops.operators.kron import KronSpec
from fim_linops.statistics import Sums
from fim_linops.structures import Structure


def _projected_linear(
    a: Tensor, g: Tensor, spec: KronSpec, ql: Tensor, qr: Tensor, res: BatchResult
) -> Tensor:
    """sum_{k,n} (Q_L^T M_kn Q_R)^2 for one nn.Linear call, (1, rows, cols).

    Index convention: k column, n example, t position, o/r output (eigen)direction,
    i/c input (eigen)direction."""
    n = a.shape[0]
    a3 = a.reshape(n, -1, a.shape[-1])  # (n, t, i)
    g3 = g.reshape(g.shape[0], n, -1, g.shape[-1])  # (k, n, t, o)
    ap = with_ones(a3, spec.has_weight and spec.w_cols > 0, spec.has_bias) @ qr[0]  # (n, t, c)
    if a3.shape[1] == 1:  # squares factorise: sum_{k,n} gp[k,n,r]^2 ap[n,c]^2
        gp = g3[:, :, 0] @ ql[0]  # (k, n, r)
        return torch.einsum("knr,nc->rc", gp**2, ap[:, 0] ** 2)[None]
    out = torch.zeros(spec.rows, spec.cols, dtype=a.dtype, device=a.device)
    k, t = g3.shape[0], a3.shape[1]
    for lo, hi in res.chunks(spec.rows * spec.cols):
        # columns in slices: their gp (s, n, t, r) and m (s, n, r, c) stay small beside g
        starts = res.slices(k, (hi - lo) * spec.rows * (t + spec.cols))
        for k0 in starts:
            gp = g3[k0 : k0 + starts.step, lo:hi] @ ql[0]  # (s, n, t, r)
            m = torch.einsum("kntr,ntc->knrc", gp, ap[lo:hi])
            out += m.square_().sum((0, 1))
    return out[None]


def _projected_conv(
    module, a: Tensor, g: Tensor, spec: KronSpec, ql: Tensor, qr: Tensor, res: BatchResult
) -> Tensor:
    """sum_{k,n} (Q_L^T M_kn Q_R)^2 per group for one Conv call, (groups, rows, cols).

    Index convention: k column, n example, q group, l output position, o/r output channel
    (eigendirection) within the group, j/c patch entry (eigendirection)."""
    g5 = ConvRule._g(module, g)  # (k, n, q, o, l)
    u = with_ones(a, spec.has_weight and spec.w_cols > 0, spec.has_bias)  # (n, q, l, j)
    up = torch.einsum("nqlj,qjc->nqlc", u, qr)
    out = torch.zeros(spec.groups, spec.rows, spec.cols, dtype=a.dtype, device=a.device)
    k, positions = g5.shape[0], g5.shape[-1]
    for lo, hi in res.chunks(spec.groups * spec.rows * spec.cols):
        # columns in slices: their gp (s, n, q, r, l) and m (s, n, q, r, c) stay small beside g
        per_column = (hi - lo) * spec.groups * spec.rows * (positions + spec.cols)
        starts = res.slices(k, per_column)
        for k0 in starts:
            gp = torch.einsum("knqol,qor->knqrl", g5[k0 : k0 + starts.step, lo:hi], ql)
            m = torch.einsum("knqrl,nqlc->knqrc", gp, up[lo:hi])
            out += m.square_().sum((0, 1))
    return out


def _projected_generic(res: BatchResult, i: int, spec: KronSpec, ql: Tensor, qr: Tensor) -> Tensor:
    """sum_{k,n} (Q_L^T M_kn Q_R)^2 from the block's per-example gradients (any Kronecker rule,
    shared modules included), (groups, rows, cols). The (K, n, p) gradients are the column
    chunk's counted workspace; their projections are made a slice of rows (k, n) at a time."""
    p = spec.stop - spec.start
    out = None
    for lo, hi in res.chunks(p):
        gr = res.block_grads(i, lo, hi).reshape(-1, p)  # (k*n, p): row (k, n)
        starts = res.slices(gr.shape[0], p)
        for r0 in starts:
            m = spec.to_mat(gr[r0 : r0 + starts.step].T)  # (s, groups, rows, cols)
            m = ql.transpose(-1, -2) @ m @ qr
            part = m.square_().sum(0)
            out = part if out is None else out + part
        del gr
    assert out is not None  # a batch has at least one example
    return out


def eigen_sums(
    engine: Engine,
    results: Iterable[BatchResult],
    specs: tuple[KronSpec, ...],
    bases: list[tuple[Tensor, Tensor]],
) -> tuple[list[Tensor | None], int]:
    """Per ruled block, sum_{n,k} (Q_L^T M_nk Q_R)^2 (groups, rows, cols), and the example count."""
    sums: list[Tensor | None] = [None] * len(engine.ruled)
    n = 0
    for res in results:
        for i in range(len(engine.ruled)):
            part = projected_squares(res, i, specs[i], *bases[i])
            if part is None:
                continue
            prev = sums[i]
            sums[i] = part if prev is None else prev + part
        n += res.count
        del res  # release this batch before the engine makes the next
    return sums, n


def projected_squares(
    res: BatchResult, i: int, spec: KronSpec, ql: Tensor, qr: Tensor
) -> Tensor | None:
    """Ruled block i's sum_{n,k} (Q_L^T M_nk Q_R)^2 on this result (groups, rows, cols); None
    when the output did not reach the block."""
    rb = res.engine.ruled[i]
    calls = res.calls.get(i, [])
    if not calls:
        return None
    if len(calls) == 1 and isinstance(rb.rule, LinearRule):
        return _projected_linear(*calls[0], spec, ql, qr, res)
    if len(calls) == 1 and isinstance(rb.rule, ConvRule):
        return _projected_conv(rb.module, *calls[0], spec, ql, qr, res)
    return _projected_generic(res, i, spec, ql, qr)


def _reduce(ctx: BuildContext, sums: Sums) -> Sums:
    """All-reduce over processes when the context supports it (a no-op in one process)."""
    reduce = getattr(ctx, "reduce", None)
    return reduce(sums) if reduce is not None else sums


@register(Structure.EKFAC)
def build_ekfac(ctx: BuildContext) -> EKFAC:
    engine = ctx.engine
    columns: list[Tensor] | None = [] if engine.fisher_type is FisherType.MC else None
    recording = RecordingContext.of(ctx, columns)
    kfac: KFAC = BUILDERS[Structure.KFAC](recording)
    return ekfac_from_kfac(ctx, engine, kfac, ctx.results(columns=columns))


def ekfac_from_kfac(
    ctx: BuildContext, engine: Engine, kfac: KFAC, results: Iterable[BatchResult]
) -> EKFAC:
    """EKFAC's second pass: the eigenbases of ``kfac``'s factors and the eigenvalues refitted on
    ``results`` (the batches of ``engine``'s layers, with the columns of the first pass)."""
    bases = [(sym_eigh(left)[1], sym_eigh(right)[1]) for _, left, right in kfac.pairs()]
    sums, n = eigen_sums(engine, results, kfac.specs, bases)
    filled = [
        ql.new_zeros(spec.groups, spec.rows, spec.cols) if s is None else s
        for spec, (ql, _), s in zip(kfac.specs, bases, sums, strict=True)
    ]
    total = _reduce(ctx, Sums(n=n, tensors=filled))
    tensors: list[Tensor] = []
    for (ql, qr), s in zip(bases, total.tensors, strict=True):
        tensors += [ql, qr, s / max(total.n, 1)]
    return EKFAC(*tensors, specs=kfac.specs)
