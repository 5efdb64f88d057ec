r"""Statistics per structure, accumulated over batches from the engine's (a, g) and per-example
gradients. Everything here is a *sum* over examples; :func:`fim_linops.fisher.fisher` divides by
the example count once at the end (which also keeps an all-reduce across processes exact).

Shapes: K columns, n examples in a chunk, p a block's parameters, P all parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fim_linops.engine import BatchResult, Engine
from fim_linops.engine.rules.base import DIAG_CHUNK_BYTES, KronStats


@dataclass
class Sums:
    """Accumulated sums and the number of examples they cover."""

    n: int = 0
    tensors: list[Tensor] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _zeros(engine: Engine, *shape: int, like: Tensor) -> Tensor:
    return torch.zeros(*shape, dtype=like.dtype, device=like.device)


def form_all_blocks(engine: Engine) -> None:
    """Tell the engine (the base of a view) that these statistics form the per-example gradients
    of every block at once, (K, n, P): its column chunks count them within ``max_bytes``. Called
    before the first result is made (the engine's batches are a lazy generator)."""
    base = getattr(engine, "base", engine)
    base.workspace = max(base.workspace, engine.layout.numel)


def diag_sums(engine: Engine, results: Iterable[BatchResult], into: Sums | None = None) -> Sums:
    """sum_n sum_k (J_n^T V[k, n])^2, elementwise, shape (P,); added to ``into`` when given (a
    previous call's sums, continued in place)."""
    out = into if into is not None else Sums()
    total = out.tensors[0] if out.tensors else None
    parts: list[Tensor] = []  # each ruled block's slice of the total, made once
    if total is not None:
        parts = [total[rb.block.start : rb.block.stop] for rb in engine.ruled]
    for res in results:
        if total is None:
            total = _zeros(engine, engine.layout.numel, like=res.v)
            parts = [total[rb.block.start : rb.block.stop] for rb in engine.ruled]
        for i in range(len(engine.ruled)):
            add_ruled_diag(res, i, parts[i])
        if engine.fallback:
            add_fallback_diag(res, functools.partial(_entry_of, total))
        out.n += res.count
        del res  # release this batch before the engine makes the next
    assert total is not None, "fisher() rejects empty data before building"
    out.tensors = [total]
    return out


def _entry_of(total: Tensor, e: Any) -> Tensor:
    return total[e.start : e.stop]


def add_ruled_diag(res: BatchResult, i: int, part: Tensor) -> None:
    """``part`` (p_i,) += ruled block i's diagonal sum_n sum_k (J_n^T V[k, n])^2 on this result;
    the rule's per-example workspace kept within ``DIAG_CHUNK_BYTES``."""
    rb = res.engine.ruled[i]
    calls = res.calls.get(i, [])
    if len(calls) == 1:
        a, g = calls[0]
        names = rb.block.local_names
        work = rb.rule.diag_workspace(rb.module, a, g, names)
        if work == 0:
            rb.rule.add_diag(part, rb.module, a, g, names)
            return
        step = max(1, DIAG_CHUNK_BYTES // (work * g.element_size()))
        for lo in range(0, res.n, step):
            hi = min(res.n, lo + step)
            rb.rule.add_diag(part, rb.module, a[lo:hi], g[:, lo:hi], names)
    elif len(calls) > 1:  # shared module: sum the calls' gradients, then square
        for lo, hi in res.chunks(rb.block.numel):
            part += (res.block_grads(i, lo, hi) ** 2).sum((0, 1))


def add_fallback_diag(res: BatchResult, part_of: Callable[[Any], Tensor]) -> None:
    """The torch.func parameters' diagonal on this result: ``part_of(entry)`` (the entry's numel,)
    += sum_n sum_k g_nk^2 for each of their layout entries."""
    fallback = res.engine.fallback
    p_fb = sum(b.numel for b in fallback)
    for lo, hi in res.chunks(p_fb, func=True):
        grads = res.fallback_grads(lo, hi)
        for block in fallback:
            for e in block.entries:
                part_of(e).add_((grads[e.name] ** 2).sum((0, 1)).reshape(-1))
        del grads


def block_sums(engine: Engine, results: Iterable[BatchResult], into: Sums | None = None) -> Sums:
    """Per layout block, sum_n sum_k g g^T with g the block's per-example gradient, (p_b, p_b);
    added to ``into`` when given."""
    out = into if into is not None else Sums()
    blocks: list[Tensor] | None = out.tensors or None
    form_all_blocks(engine)
    for res in results:
        if blocks is None:
            blocks = [_zeros(engine, b.numel, b.numel, like=res.v) for b in engine.layout.blocks]
        # every block's (K, n, p_b) at once
        for lo, hi in res.chunks(engine.layout.numel, func=True):
            for bi, g in enumerate(res.all_block_grads(lo, hi)):
                gf = g.reshape(-1, g.shape[-1])
                blocks[bi] += gf.T @ gf
        out.n += res.count
        del res  # release this batch before the engine makes the next
    assert blocks is not None, "fisher() rejects empty data before building"
    out.tensors = blocks
    return out


def dense_sums(engine: Engine, results: Iterable[BatchResult], into: Sums | None = None) -> Sums:
    """sum_n sum_k g g^T with g the full per-example gradient, (P, P); added to ``into`` when
    given."""
    out = into if into is not None else Sums()
    total = out.tensors[0] if out.tensors else None
    form_all_blocks(engine)
    for res in results:
        if total is None:
            total = _zeros(engine, engine.layout.numel, engine.layout.numel, like=res.v)
        for lo, hi in res.chunks(engine.layout.numel, func=True):
            g = torch.cat(res.all_block_grads(lo, hi), dim=-1).reshape(-1, engine.layout.numel)
            total += g.T @ g
        out.n += res.count
        del res  # release this batch before the engine makes the next
    assert total is not None, "fisher() rejects empty data before building"
    out.tensors = [total]
    return out


def kfac_sums(
    engine: Engine, results: Iterable[BatchResult], reduce: bool = False, into: Sums | None = None
) -> Sums:
    """Per ruled block, the Kronecker factor sums (left, right) and the A-row count; added to
    ``into`` when given."""
    out = into if into is not None else Sums()
    stats: list[KronStats | None] = out.extra.get("stats") or [None] * len(engine.ruled)
    for res in results:
        for i, rb in enumerate(engine.ruled):
            for a, g in res.calls.get(i, []):  # in place: the factors are owned by this loop
                stats[i] = rb.rule.add_kfac(
                    stats[i], rb.module, a, g, rb.block.local_names, reduce, with_a=res.first
                )
        out.n += res.count
        del res  # release this batch before the engine makes the next
    out.extra["stats"] = stats
    return out
