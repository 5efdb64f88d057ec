r"""Statistics reduced to their owners during the data pass, one result and one layer at a time.

``fisher_sharded`` must not hold on any rank what FSDP2 spreads over all of them. Summing every
statistic locally and reduce-scattering once at the end would hold the whole diagonal (P entries)
or every layer's Kronecker factors on every rank for the length of the pass. Here each result of
the engine (a batch, or one chunk of its back-propagated columns) is reduced as it comes: for each
layer, its contribution is formed, ``dist.reduce``-d to the ranks that own it (the diagonal: the
owners of its FSDP2 row shards; Kronecker factors and EKFAC eigenvalues: the layer's one owner)
and dropped; each owner adds what it receives to its share. A rank holds its share plus one
layer's contribution of one result.

Every rank must run the same collectives in the same order, but the ranks' data differ (numbers
of batches, and of column chunks per batch). Zero contributions change no sum, and sums do not
depend on which results meet in a step, so the ranks only have to agree on the number of steps:

* ``gather="all"`` (no collective in the pass): :class:`Steps`. Before each real step a rank
  all-reduces (MAX) a flag 1; at the end, a rank runs *zero steps* (flag 0, then the same
  reductions with zero contributions) for as long as another rank still has a real step, and all
  stop together when the MAX is 0.
* ``gather="unit"``: the forwards and every backward pass are collectives (FSDP's all-gathers),
  and the :class:`~fim_linops.sharding.lockstep.Lockstep` already makes every rank run the same
  forwards and, per forward, the same number of backward passes (``agree_chunks``). One step per
  backward pass then keeps the reductions in step with them: a real step per result, a zero step
  per column chunk of a stand-in batch (``Lockstep.stand_in``); no flags.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fim_linops.engine import BatchResult, Engine
from fim_linops.sharding import shards
from fim_linops.sharding.shards import Ownership


class Steps:
    """Equal numbers of reduction steps on every rank of ``group`` (see the module)."""

    def __init__(self, group: Any, device: torch.device):
        self.group, self.device = group, device

    def _any(self, flag: float) -> bool:
        t = torch.tensor([flag], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t[0] > 0)

    def real(self) -> None:
        """Announce a real step (before its reductions)."""
        if self.group is not None:
            self._any(1.0)

    def drain(self, zero_step: Callable[[], None]) -> None:
        """Run zero steps while another rank still has real ones."""
        if self.group is None:
            return
        while self._any(0.0):
            zero_step()


@dataclass(frozen=True)
class Segment:
    """A range ``[start, stop)`` of the flat vector and who owns which part of it: per rank, the
    ranges local to the segment; for this rank, where each of its ranges goes in its packed
    share (``into``, in the same order)."""

    numel: int
    parts: tuple[tuple[tuple[int, int], ...], ...]
    into: tuple[tuple[int, int], ...]


def segment(start: int, stop: int, ownership: Ownership, me: int) -> Segment:
    parts: list[tuple[tuple[int, int], ...]] = []
    into: list[tuple[int, int]] = []
    for r, ranges in enumerate(ownership):
        local, offset = [], 0
        for lo, hi in ranges:
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                local.append((a - start, b - start))
                if r == me:
                    into.append((offset + a - lo, offset + b - lo))
            offset += hi - lo
        parts.append(tuple(local))
    return Segment(stop - start, tuple(parts), tuple(into))


def reduce_segment(buf: Tensor, seg: Segment, mine: Tensor, group: Any, me: int) -> None:
    """``mine`` (this rank's packed share) += the sum over the ranks of ``buf`` (seg.numel,) at
    this rank's part of the segment; one ``dist.reduce`` per rank owning a part of it."""
    for r, ranges in enumerate(seg.parts):
        if not ranges:
            continue
        part = shards.pack(buf, ranges)  # a copy: reduce may overwrite it
        reduce_to([part], r, group)
        if r != me:
            continue
        offset = 0
        for lo, hi in seg.into:
            mine[lo:hi] += part[offset : offset + hi - lo]
            offset += hi - lo


def reduce_to(tensors: list[Tensor], owner: int, group: Any) -> None:
    """Sum ``tensors`` (contiguous) over the ranks, in place on rank ``owner`` of ``group``."""
    if group is None:
        return
    for t in tensors:
        dist.reduce(t, dst=shards._global(group, owner), op=dist.ReduceOp.SUM, group=group)


@dataclass
class Pass:
    """What a streamed pass needs: the results, the group, this rank, the statistics' dtype and
    device, and how to drain before each forward (a Lockstep, or None)."""

    engine: Engine
    results: Iterable[BatchResult]
    group: Any
    me: int
    dtype: torch.dtype
    device: torch.device
    lockstep: Any = None
    #: the most statistic entries this rank held at once during the pass (its share plus the
    #: contribution in flight), for the documentation and the tests
    held: int = 0

    def run(self, step: Callable[[BatchResult | None], int]) -> int:
        """``step(res)`` for each result, ``step(None)`` for the zero steps; returns the
        results' example count. ``step`` returns the entries it held at once."""
        # in lockstep every rank already runs the same backward passes: no flags
        steps = Steps(None if self.lockstep is not None else self.group, self.device)

        def zero() -> None:
            self.held = max(self.held, step(None))

        if self.lockstep is not None:
            self.lockstep.stand_in = zero
        n = 0
        try:
            for res in self.results:
                steps.real()
                self.held = max(self.held, step(res))
                n += res.count
                del res  # release this result before the engine makes the next
            steps.drain(zero)
        finally:
            if self.lockstep is not None:
                self.lockstep.stand_in = None
        return n


def owned_diag(p: Pass, ownership: Ownership) -> tuple[Tensor, int]:
    """This rank's packed share of sum_n diag(F_n) (FSDP2 row shards) and the local count."""
    from fim_linops.statistics import add_fallback_diag, add_ruled_diag

    engine = p.engine
    mine = torch.zeros(shards.count(ownership[p.me]), dtype=p.dtype, device=p.device)
    ruled = [segment(rb.block.start, rb.block.stop, ownership, p.me) for rb in engine.ruled]
    entries = [e for b in engine.fallback for e in b.entries]
    func = [segment(e.start, e.stop, ownership, p.me) for e in entries]

    def step(res: BatchResult | None) -> int:
        held = 0
        for i, seg in enumerate(ruled):
            buf = torch.zeros(seg.numel, dtype=p.dtype, device=p.device)
            if res is not None:
                add_ruled_diag(res, i, buf)
            reduce_segment(buf, seg, mine, p.group, p.me)
            held = max(held, seg.numel)
        if entries:  # the torch.func parameters' per-example gradients come all at once
            bufs = {e.name: torch.zeros(e.numel, dtype=p.dtype, device=p.device) for e in entries}
            if res is not None:
                add_fallback_diag(res, lambda e: bufs[e.name])
            for e, seg in zip(entries, func, strict=True):
                reduce_segment(bufs[e.name], seg, mine, p.group, p.me)
            held = max(held, sum(e.numel for e in entries))
        return mine.numel() + held

    return mine, p.run(step)


def owned_kfac(
    p: Pass, owners: tuple[int, ...], reduce: bool
) -> tuple[list[tuple[Tensor, Tensor] | None], Tensor, int]:
    """Each layer's Kronecker factor sums (left, right) on its owner (None elsewhere), the
    layers' input-row counts (local, float64) and the local example count."""
    engine = p.engine
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(engine.ruled)
    rows = [0] * len(engine.ruled)

    def step(res: BatchResult | None) -> int:
        held = 0
        for i, rb in enumerate(engine.ruled):
            names = rb.block.local_names
            st = None
            if res is not None:
                for a, g in res.calls.get(i, []):
                    st = rb.rule.add_kfac(st, rb.module, a, g, names, reduce, with_a=res.first)
            if st is None:
                st = rb.rule.zero_kron_stats(rb.module, names, p.dtype, p.device)
            rows[i] += st.a_rows
            pair = [st.left_sum.to(p.dtype).contiguous(), st.right_sum.to(p.dtype).contiguous()]
            reduce_to(pair, owners[i], p.group)
            held = max(held, pair[0].numel() + pair[1].numel())
            if owners[i] == p.me:
                prev = out[i]
                out[i] = (
                    (pair[0], pair[1]) if prev is None else (prev[0] + pair[0], prev[1] + pair[1])
                )
        return _numel(out) + held

    n = p.run(step)
    return out, torch.tensor(rows, dtype=torch.float64, device=p.device), n


def owned_eigen_sums(
    p: Pass, owners: tuple[int, ...], specs: tuple, bases: list[tuple[Tensor, Tensor]]
) -> tuple[list[Tensor | None], int]:
    """EKFAC's refitted eigenvalue sums sum_{n,k} (Q_L^T M_nk Q_R)^2 per layer on its owner."""
    from fim_linops.builders.ekfac import projected_squares

    out: list[Tensor | None] = [None] * len(p.engine.ruled)

    def step(res: BatchResult | None) -> int:
        held = 0
        for i, spec in enumerate(specs):
            part = None if res is None else projected_squares(res, i, spec, *bases[i])
            if part is None:
                part = torch.zeros(
                    spec.groups, spec.rows, spec.cols, dtype=p.dtype, device=p.device
                )
            part = part.to(p.dtype).contiguous()
            reduce_to([part], owners[i], p.group)
            held = max(held, part.numel())
            if owners[i] == p.me:
                prev = out[i]
                out[i] = part if prev is None else prev + part
        return sum(t.numel() for t in out if t is not None) + held

    return out, p.run(step)


def _numel(pairs: list[tuple[Tensor, Tensor] | None]) -> int:
    return sum(a.numel() + b.numel() for ab in pairs if ab is not None for a, b in [ab])
