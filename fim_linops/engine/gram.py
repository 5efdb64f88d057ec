r"""NTK Gram blocks from the engine's per-layer statistics.

For two batches with back-propagated output columns (K and Q of them; the identity for the NTK),
the Gram block is Theta[n, k, m, q] = sum_p J1[k, n, p] J2[q, m, p] = sum over layers of each
layer's block, written straight into the output in its final order (row n*K + k, column m*Q + q).
Per layer the cheaper features are kept:

* Linear without positions (a (n, i), g (K, n, o)): ``LinearFeats`` ab = [a; 1] (n, j) and g
  example-major (n, K, o); the block is (ab1 ab2^T) * (G1 G2^T): one GEMM over the outputs for
  all K x Q column pairs, (n K, o) @ (o, m Q), then one fused multiply-add with the (n, m) input
  Gram broadcast over k, q (never the gradients);
* layers where the rule's own Gram from (a, g) is cheaper (convolutions with few positions,
  embeddings, sequences): ``RuleFeats``, contracted by the rule;
* every other block, and parameters without a rule (torch.func): per-example gradients
  ``GradFeats`` (n, K, p), the block one GEMM (n K, p) @ (p, m Q).

With ``trace`` (the sum over outputs, k = q) the GEMMs run over (k, o) / (k, p) at once:
(n, K o) @ (K o, m).

Each batch runs through the model once: :func:`gram_matrix` streams over the batches of both
sides with O(B1 + B2) forward/backward passes. When the second side is the first, only the
blocks on and below the diagonal are computed, in tiles of examples (also inside one batch), and
mirrored: Theta(x_j, x_i) = Theta(x_i, x_j)^T, about half the work.

Index convention: k, q columns; n, m examples; o outputs of a layer; j its inputs (+1 for the
bias); p parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from fim_linops.engine.engine import BatchResult, Engine
from fim_linops.engine.rules.linear import LinearRule, with_ones

#: examples per tile of the symmetric Gram (tiles below the diagonal computed, above mirrored);
#: large tiles keep the GEMMs large (many small ones lose to thread synchronisation on busy CPUs)
MIN_TILE = 128
MAX_TILES_PER_BATCH = 4


@dataclass
class LinearFeats:
    """A Linear layer without positions: ab (n, j) = [a, 1] (what the block holds) and g
    example-major (n, K, o)."""

    ab: Tensor
    g: Tensor

    def rows(self, lo: int, hi: int) -> LinearFeats:
        return LinearFeats(self.ab[lo:hi], self.g[lo:hi])


@dataclass
class GradFeats:
    """Per-example gradients, example-major (n, K, p)."""

    j: Tensor

    def rows(self, lo: int, hi: int) -> GradFeats:
        return GradFeats(self.j[lo:hi])


@dataclass
class RuleFeats:
    """The calls [(a (n, ...), g (K, n, ...))] of a layer whose rule contracts them itself."""

    calls: list[tuple[Tensor, Tensor]]

    def rows(self, lo: int, hi: int) -> RuleFeats:
        return RuleFeats([(a[lo:hi], g[:, lo:hi]) for a, g in self.calls])


Feats = LinearFeats | GradFeats | RuleFeats


@dataclass
class Side:
    """What one batch (or a tile of its examples) leaves for Gram blocks: per ruled block its
    features (None: the layer was not reached) and the torch.func parameters' gradients."""

    n: int
    k: int
    ruled: list[Feats | None]
    func: GradFeats | None

    def rows(self, lo: int, hi: int) -> Side:
        """The examples lo:hi of this side."""
        return Side(
            hi - lo,
            self.k,
            [None if f is None else f.rows(lo, hi) for f in self.ruled],
            None if self.func is None else self.func.rows(lo, hi),
        )


def _is_plain_linear(rule: object, calls: list[tuple[Tensor, Tensor]]) -> bool:
    """One call of a Linear layer on (n, i) inputs (no positions)."""
    return isinstance(rule, LinearRule) and len(calls) == 1 and calls[0][0].ndim == 2


def side(res: BatchResult) -> Side:
    """The Gram features of one batch (per-example gradients only where cheaper)."""
    engine = res.engine
    ruled: list[Feats | None] = []
    for i, rb in enumerate(engine.ruled):
        calls = res.calls.get(i, [])
        names = rb.block.local_names
        if not calls:
            ruled.append(None)
        elif _is_plain_linear(rb.rule, calls):
            a, g = calls[0]
            ab = with_ones(a, "weight" in names, "bias" in names)
            ruled.append(LinearFeats(ab, g.transpose(0, 1).contiguous()))
        elif all(rb.rule.gram_from_ag(rb.module, a, g, names) for a, g in calls):
            ruled.append(RuleFeats(calls))
        else:
            ruled.append(GradFeats(res.block_grads(i, 0, res.n).transpose(0, 1).contiguous()))
    func = None
    if engine.fallback:
        grads = res.fallback_grads(0, res.n)
        j = torch.cat(
            [grads[e.name].reshape(res.k, res.n, -1) for b in engine.fallback for e in b.entries],
            -1,
        )
        func = GradFeats(j.transpose(0, 1).contiguous())
    return Side(res.n, res.k, ruled, func)


def _as_grads(engine: Engine, i: int, f: Feats) -> GradFeats:
    """Any features of ruled block i as per-example gradients (n, K, p)."""
    if isinstance(f, GradFeats):
        return f
    rb = engine.ruled[i]
    if isinstance(f, LinearFeats):
        # n: example, k: column, o: output, j: input (+ bias)
        j = torch.einsum("nko,nj->nkoj", f.g, f.ab)
        names = rb.block.local_names
        if "weight" in names and "bias" in names:  # public order: W (o, i) then b (o,)
            j = torch.cat([j[..., :-1].flatten(2), j[..., -1]], dim=-1)
        return GradFeats(j.flatten(2))
    names = rb.block.local_names
    grads = [rb.rule.grads(rb.module, a, g, names) for a, g in f.calls]  # (K, n, p) per call
    return GradFeats(torch.stack(grads).sum(0).transpose(0, 1))


def _add_grads(out: Tensor, j1: Tensor, j2: Tensor, trace: bool) -> None:
    """out += J1 J2^T for per-example gradients (n, K, p), (m, Q, p), output order."""
    if trace:  # sum over k = q and p at once
        out.addmm_(j1.reshape(j1.shape[0], -1), j2.reshape(j2.shape[0], -1).T)
    else:
        out.addmm_(j1.reshape(-1, j1.shape[-1]), j2.reshape(-1, j2.shape[-1]).T)


def _add_linear(out: Tensor, f1: LinearFeats, f2: LinearFeats, trace: bool) -> None:
    """out += (ab1 ab2^T) * (G1 G2^T), one GEMM over the outputs o for all column pairs."""
    inner = f1.ab @ f2.ab.T  # (n, m)
    n, k, m = f1.g.shape[0], f1.g.shape[1], f2.g.shape[0]
    if trace:  # sum_k <g1[n, k], g2[m, k]>: one GEMM over (k, o)
        gg = f1.g.reshape(n, -1) @ f2.g.reshape(m, -1).T
        out.addcmul_(gg, inner)
        return
    q = f2.g.shape[1]
    gg = f1.g.reshape(n * k, -1) @ f2.g.reshape(m * q, -1).T  # (n k, m q)
    out.view(n, k, m, q).addcmul_(gg.view(n, k, m, q), inner[:, None, :, None])


def _add_rule(
    engine: Engine, i: int, out: Tensor, f1: RuleFeats, f2: RuleFeats, trace: bool
) -> None:
    rb = engine.ruled[i]
    names = rb.block.local_names
    for a1, g1 in f1.calls:
        for a2, g2 in f2.calls:
            blk = rb.rule.gram(rb.module, a1, g1, a2, g2, names)  # (K, n, Q, m)
            if trace:
                out += blk.diagonal(dim1=0, dim2=2).sum(-1)
            else:
                k, n, q, m = blk.shape
                out.view(n, k, m, q).add_(blk.permute(1, 0, 3, 2))


def add_block(engine: Engine, out: Tensor, s1: Side, s2: Side, trace: bool) -> Tensor:
    """out += Theta between two sides: (n1 K, n2 Q) (row n K + k), or (n1, n2) with ``trace``."""
    for i, (f1, f2) in enumerate(zip(s1.ruled, s2.ruled, strict=True)):
        if f1 is None or f2 is None:  # the layer was not reached: zero block
            continue
        if isinstance(f1, LinearFeats) and isinstance(f2, LinearFeats):
            _add_linear(out, f1, f2, trace)
        elif isinstance(f1, RuleFeats) and isinstance(f2, RuleFeats):
            _add_rule(engine, i, out, f1, f2, trace)
        else:
            _add_grads(out, _as_grads(engine, i, f1).j, _as_grads(engine, i, f2).j, trace)
    if s1.func is not None and s2.func is not None:
        _add_grads(out, s1.func.j, s2.func.j, trace)
    return out


def _zeros(engine: Engine, rows: int, cols: int) -> Tensor:
    p0 = engine.layout.entries[0].param
    return torch.zeros(rows, cols, dtype=p0.dtype, device=p0.device)


def gram_block(engine: Engine, s1: Side, s2: Side) -> Tensor:
    """Theta[k, n, q, m] between two sides, shape (K1, n1, K2, n2)."""
    out = add_block(engine, _zeros(engine, s1.n * s1.k, s2.n * s2.k), s1, s2, trace=False)
    return out.view(s1.n, s1.k, s2.n, s2.k).permute(1, 0, 3, 2)


def gram_per_example(engine: Engine, s: Side) -> Tensor:
    """The per-example blocks Theta[n, k, n, q] of one side, shape (n, K, K), without the
    (n K, n K) block: Linear (ab . ab)[n] G_n G_n^T; gradients J_n J_n^T."""
    out = torch.zeros(s.n, s.k, s.k, dtype=_dtype(engine), device=_device(engine))
    for i, f in enumerate(s.ruled):
        if f is None:
            continue
        if isinstance(f, LinearFeats):
            out.baddbmm_(f.g * f.ab.square().sum(-1)[:, None, None], f.g.transpose(1, 2))
            continue
        j = _as_grads(engine, i, f).j  # (n, K, p)
        out.baddbmm_(j, j.transpose(1, 2))
    if s.func is not None:
        out.baddbmm_(s.func.j, s.func.j.transpose(1, 2))
    return out


def _dtype(engine: Engine) -> torch.dtype:
    return engine.layout.entries[0].param.dtype


def _device(engine: Engine) -> torch.device:
    return engine.layout.entries[0].param.device


def gram_diag(res: BatchResult) -> Tensor:
    """The diagonal Theta[k, n, k, n] of one batch, shape (K, n), without the n x n block."""
    engine = res.engine
    out = torch.zeros(res.k, res.n, dtype=res.v.dtype, device=res.v.device)
    for i, rb in enumerate(engine.ruled):
        calls = res.calls.get(i, [])
        if len(calls) == 1:
            a, g = calls[0]
            out += rb.rule.gram_diag(rb.module, a, g, rb.block.local_names)
        elif calls:  # several calls: their gradients add before squaring
            out += res.block_grads(i, 0, res.n).square().sum(-1)
    if engine.fallback:
        for t in res.fallback_grads(0, res.n).values():
            out += t.reshape(res.k, res.n, -1).square().sum(-1)
    return out


def _tiles(n: int) -> list[tuple[int, int]]:
    """Example ranges splitting a batch of n into at most MAX_TILES_PER_BATCH tiles."""
    size = max(MIN_TILE, -(-n // MAX_TILES_PER_BATCH))
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


def gram_matrix(
    engine: Engine, batches1: Iterable, batches2: Iterable | None = None, trace: bool = False
) -> Tensor:
    r"""The full Gram matrix over all batches: (N1*K, N2*K), row n*K + k (or (N1, N2) with
    ``trace``: sum_k Theta[k, n, k, m]). ``batches2=None``: the symmetric Gram of ``batches1``,
    only tiles on and below the diagonal computed, the others mirrored. Features of the second
    side are kept in memory (per layer (a, g) or per-example gradients, whichever is smaller to
    contract); the output is allocated once and filled in place."""
    if batches2 is None:
        tiles: list[Side] = []
        for res in engine.run(batches1):
            s = side(res)
            tiles += [s.rows(lo, hi) for lo, hi in _tiles(s.n)]
            del res  # release this batch before the engine makes the next
        return _symmetric(engine, tiles, trace)
    sides2 = []
    for res in engine.run(batches2):
        sides2.append(side(res))
        del res  # release this batch before the engine makes the next
    n2 = sum(s.n for s in sides2)
    rows = []
    for res in engine.run(batches1):
        s = side(res)
        k = 1 if trace else s.k
        row = _zeros(engine, s.n * k, n2 * k)
        c0 = 0
        for s2 in sides2:
            c1 = c0 + s2.n * k
            add_block(engine, row[:, c0:c1], s, s2, trace)
            c0 = c1
        rows.append(row)
        del res  # release this batch before the engine makes the next
    return torch.cat(rows, dim=0)


def _symmetric(engine: Engine, tiles: list[Side], trace: bool) -> Tensor:
    """Theta(x, x) from its tiles of examples: lower blocks computed, upper ones mirrored."""
    k = 1 if trace else tiles[0].k
    starts = [0]
    for t in tiles:
        starts.append(starts[-1] + t.n * k)
    out = _zeros(engine, starts[-1], starts[-1])
    for i, ti in enumerate(tiles):
        for j in range(i + 1):
            blk = out[starts[i] : starts[i + 1], starts[j] : starts[j + 1]]
            add_block(engine, blk, ti, tiles[j], trace)
            if j < i:
                out[starts[j] : starts[j + 1], starts[i] : starts[i + 1]] = blk.T
    return out


def gram_diagonal(engine: Engine, batches: Iterable, trace: bool = False) -> Tensor:
    """diag of the symmetric Gram: (N*K,) with index n*K + k, or (N,) summed over k."""
    parts = []
    for res in engine.run(batches):
        d = gram_diag(res)  # (K, n)
        parts.append(d.sum(0) if trace else d.T.reshape(-1))
        del res  # release this batch before the engine makes the next
    return torch.cat(parts)
