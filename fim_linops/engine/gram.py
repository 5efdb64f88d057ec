r"""NTK Gram blocks from the engine's per-layer statistics.

For two batches with back-propagated output columns (K1 and K2 of them; the identity for the NTK),
the Gram block is Theta[k, n, q, m] = sum_p J1[k, n, p] J2[q, m, p] = sum over layers of each
layer's block. A layer with a rule keeps what is cheaper to contract (its (a, g), e.g. Linear:
(A1 A2^T + 1) * (G1 G2^T), or its per-example gradients (K, N, p)); parameters without a rule
contribute through torch.func per-example gradients. Each batch is run through the model once:
:func:`gram_matrix` streams over the batches of both sides with O(B1 + B2) forward/backward passes
(O(B) when the second side is the first, using Theta(x2, x1) = Theta(x1, x2)^T).

Index convention: k, q columns; n, m examples; p parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from fim_linops.engine.engine import BatchResult, Engine


@dataclass
class Side:
    """What one batch leaves for Gram blocks: per ruled block either its calls [(a, g)] or its
    per-example gradients (K, n, p); and the torch.func parameters' gradients (K, n, p_f)."""

    n: int
    k: int
    ruled: list[list[tuple[Tensor, Tensor]] | Tensor]
    func: Tensor | None


def side(res: BatchResult) -> Side:
    """The Gram features of one batch (per-example gradients only where cheaper)."""
    engine = res.engine
    ruled: list[list[tuple[Tensor, Tensor]] | Tensor] = []
    for i, rb in enumerate(engine.ruled):
        calls = res.calls.get(i, [])
        names = rb.block.local_names
        if calls and all(rb.rule.gram_from_ag(rb.module, a, g, names) for a, g in calls):
            ruled.append(calls)
        else:
            ruled.append(res.block_grads(i, 0, res.n))
    func = None
    if engine.fallback:
        grads = res.fallback_grads(0, res.n)
        func = torch.cat(
            [grads[e.name].reshape(res.k, res.n, -1) for b in engine.fallback for e in b.entries],
            -1,
        )
    return Side(res.n, res.k, ruled, func)


def _grads(engine: Engine, i: int, feats: list[tuple[Tensor, Tensor]] | Tensor) -> Tensor:
    if isinstance(feats, Tensor):
        return feats
    rb = engine.ruled[i]
    return sum(rb.rule.grads(rb.module, a, g, rb.block.local_names) for a, g in feats)


def gram_block(engine: Engine, s1: Side, s2: Side) -> Tensor:
    """Theta[k, n, q, m] between two batches, shape (K1, n1, K2, n2)."""
    out = None
    for i, rb in enumerate(engine.ruled):
        f1, f2 = s1.ruled[i], s2.ruled[i]
        if isinstance(f1, list) and isinstance(f2, list):
            if not f1 or not f2:  # the layer was not reached: zero block
                continue
            names = rb.block.local_names
            blk = sum(
                rb.rule.gram(rb.module, a1, g1, a2, g2, names) for a1, g1 in f1 for a2, g2 in f2
            )
        else:
            if isinstance(f1, list) and not f1 or isinstance(f2, list) and not f2:
                continue
            blk = torch.einsum("knp,qmp->knqm", _grads(engine, i, f1), _grads(engine, i, f2))
        out = blk if out is None else out + blk
    if s1.func is not None and s2.func is not None:
        blk = torch.einsum("knp,qmp->knqm", s1.func, s2.func)
        out = blk if out is None else out + blk
    if out is None:
        dt, dev = engine.layout.entries[0].param.dtype, engine.layout.entries[0].param.device
        out = torch.zeros(s1.k, s1.n, s2.k, s2.n, dtype=dt, device=dev)
    return out


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


def _reduce(blk: Tensor, trace: bool) -> Tensor:
    """(K1, n1, K2, n2) -> (n1*K1, n2*K2) (row n*K + k), or (n1, n2) summed over k = q."""
    if trace:
        return blk.diagonal(dim1=0, dim2=2).sum(-1)
    k, n, q, m = blk.shape
    return blk.permute(1, 0, 3, 2).reshape(n * k, m * q)


def gram_matrix(
    engine: Engine, batches1: Iterable, batches2: Iterable | None = None, trace: bool = False
) -> Tensor:
    r"""The full Gram matrix over all batches: (N1*K, N2*K), row n*K + k (or (N1, N2) with
    ``trace``: sum_k Theta[k, n, k, m]). ``batches2=None``: the symmetric Gram of ``batches1``,
    each off-diagonal block computed once. Features of the second side are kept in memory (per
    layer (a, g) or per-example gradients, whichever is smaller to contract)."""
    sides1: list[Side] = []
    blocks: dict[tuple[int, int], Tensor] = {}
    if batches2 is None:
        for i, res in enumerate(engine.run(batches1)):
            s = side(res)
            sides1.append(s)
            for j in range(i + 1):
                blocks[i, j] = _reduce(gram_block(engine, s, sides1[j]), trace)
        rows = []
        for i in range(len(sides1)):
            row = [blocks[i, j] if j <= i else blocks[j, i].mT for j in range(len(sides1))]
            rows.append(torch.cat(row, dim=1))
        return torch.cat(rows, dim=0)
    sides2 = [side(res) for res in engine.run(batches2)]
    rows = []
    for res in engine.run(batches1):
        s = side(res)
        rows.append(torch.cat([_reduce(gram_block(engine, s, s2), trace) for s2 in sides2], dim=1))
    return torch.cat(rows, dim=0)


def gram_diagonal(engine: Engine, batches: Iterable, trace: bool = False) -> Tensor:
    """diag of the symmetric Gram: (N*K,) with index n*K + k, or (N,) summed over k."""
    parts = []
    for res in engine.run(batches):
        d = gram_diag(res)  # (K, n)
        parts.append(d.sum(0) if trace else d.T.reshape(-1))
    return torch.cat(parts)
