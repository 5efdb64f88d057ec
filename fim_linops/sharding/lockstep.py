r"""``gather="unit"``: the build's data pass on the FSDP2 model as FSDP itself runs it, one unit's
parameters at a time.

With FSDP's hooks left in place, each forward all-gathers one ``fully_shard`` unit's parameters
before that unit runs and frees them after it (``reshard_after_forward``), and the engine's batched
backward to the layer outputs re-gathers each unit in its pre-backward hook; no parameter gradient
is formed, so nothing is reduce-scattered. A rank then holds its own shards (P / W) plus the units
being computed, instead of all P parameters (:func:`~fim_linops.sharding.gathered`).

Every forward is a collective, so the ranks must run the same number of them:

* **lockstep over uneven data**: before each batch the ranks all-reduce (MAX) whether they still
  have one; while any has, a rank that has run out repeats its last batch (a *stand-in*: it runs
  for the collectives, its result is dropped: no statistic, no example count). A rank with no
  batch at all cannot stand in: every rank then raises the same error;
* **the first-batch checks** (:mod:`fim_linops.engine.checks`) run side forwards whose number
  depends on the rank's data (e.g. a forward of one example only when the batch has two or more):
  they run before the pass on the gathered model (FSDP's hooks lifted, no collective), on each
  rank's first batch. That is the only moment the build holds all P parameters, with the
  activations of a few examples. (Running them on the sharded model and then evening out the
  forward counts does not work: the collectives of a forward that one rank runs and another
  does not would meet those of a different call, and deadlock);
* modules without a layer rule go through ``torch.func.functional_call``, which FSDP's pre-forward
  hook would undo: a model with such modules needs ``gather="all"`` (an error says so).

MC columns: a stand-in's sampled columns are kept (after the real batches' ones, so the real
batches draw the same samples as in a plain build) and given back to it in a second pass (EKFAC).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fim_linops.data import EmptyData, iter_batches
from fim_linops.engine import BatchResult, Engine
from fim_linops.engine.columns import column_ranges
from fim_linops.sharding.gather import gathered


class Lockstep:
    """Wraps ``engine.run`` so that every rank of ``group`` runs the same forwards (see module)."""

    def __init__(self, engine: Engine, group: Any):
        self.engine, self.group = engine, group
        self._run = engine.run
        self._stand_in_columns: list[Tensor] = []
        #: run for each column chunk of a stand-in batch (whose result is dropped): a streamed
        #: reduction (:mod:`fim_linops.sharding.stream`) runs its zero step there, so that every
        #: rank runs one reduction step per backward pass, in step with the passes' collectives
        self.stand_in: Callable[[], None] | None = None
        engine.run = self.run  # type: ignore[method-assign]
        engine.agree_chunks = self.agree_chunks

    def check_first_batch(self, data: Any, device: Any, dtype: torch.dtype) -> Any:
        """Run the engine's first-batch checks on this rank's first batch on the gathered model;
        returns ``data`` (a one-shot iterator with its first batch put back). Every rank needs
        a batch (else every rank raises the same error)."""
        batches = iter_batches(data, device, dtype, True, self.engine.model)
        empty: EmptyData | None = None
        try:
            first = next(iter(batches), None)
        except EmptyData as e:
            first, empty = None, e
        if self._max(float(first is None)) > 0:
            raise empty if empty is not None else self._no_batch()
        assert first is not None
        with gathered(self.engine.model):  # FSDP's hooks lifted: no collective inside
            self.engine.exclude_raw_uses(first[0])
        if isinstance(data, Iterator):
            data = itertools.chain([first], batches)
        return data

    def agree_chunks(self, k: int, step: int) -> list[tuple[int, int]]:
        """The column ranges of a batch's backward passes, as many on every rank: each backward
        re-gathers FSDP units (collectives), so a rank whose batch needs fewer passes than
        another's (fewer columns, or more per pass) splits its K columns into the largest number
        of passes of any rank and pads with empty ranges (a zero column, adding nothing)."""
        chunks = -(-k // step) if k else 0
        most = int(self._max(float(chunks)))
        if most == chunks:
            return column_ranges(k, step)
        ranges = column_ranges(k, -(-k // most)) if k else []
        return ranges + [(k, k)] * (most - len(ranges))

    def _max(self, value: float) -> float:
        """The largest ``value`` over the ranks (one all-reduce)."""
        t = torch.tensor([value], device=self.engine.layout.entries[0].param.device)
        if self.group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t[0])

    @staticmethod
    def _no_batch() -> ValueError:
        return ValueError(
            "fisher_sharded(gather='unit') runs every forward on every rank (FSDP gathers each "
            "unit's parameters collectively), but a rank has no batch to take part with; give "
            "every rank at least one batch, or use gather='all'"
        )

    def _batches(self, data: Any, real: list[bool]) -> Iterator[tuple[Any, Tensor | None]]:
        device = self.engine.layout.entries[0].param.device
        it = iter(iter_batches(data, None, None, True, self.engine.model))
        last, empty = None, None
        while True:
            try:
                nxt = next(it, None)
            except EmptyData as e:
                nxt, empty = None, e
            # [has a batch, cannot stand in]: MAX over the ranks
            flags = torch.tensor(
                [float(nxt is not None), float(nxt is None and last is None)], device=device
            )
            if self.group is not None:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            if flags[0] == 0:
                return
            if flags[1] != 0:  # a one-shot iterator that was consumed, on some rank
                raise empty if empty is not None else self._no_batch()
            real.append(nxt is not None)
            if nxt is not None:
                last = nxt
            assert last is not None
            yield last

    def run(
        self,
        data: Any,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
        need_grads: bool = True,
        columns: list[Tensor] | None = None,
        stream: bool = False,
    ) -> Generator[BatchResult, None, None]:
        """``engine.run`` in lockstep: the results of this rank's real batches only (with
        ``stream``, each of their column chunks; a stand-in's chunks' columns are joined)."""
        real: list[bool] = []
        if columns is None:
            self._stand_in_columns = []
        else:  # the stand-ins come after the real batches: their columns after the real ones
            columns = list(columns) + self._stand_in_columns
        results = self._run(
            self._batches(data, real), device, dtype, progress, need_grads, columns, stream
        )
        batch = -1
        for res in results:
            batch += int(res.first)
            if real[batch]:
                yield res
            elif columns is None:
                if res.first:
                    self._stand_in_columns.append(res.v)
                else:
                    self._stand_in_columns[-1] = torch.cat([self._stand_in_columns[-1], res.v])
            if not real[batch] and self.stand_in is not None:
                self.stand_in()
            del res
