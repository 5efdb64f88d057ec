"""The builder registry and the context a builder receives."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, fields
from typing import Any

import torch

from fim_linops.distributed import all_reduce_, all_reduce_count
from fim_linops.engine import BatchResult, Engine
from fim_linops.engine.ruled import RuledBlock
from fim_linops.operators.base import FisherOperator
from fim_linops.operators.kron import KronSpec
from fim_linops.options import BuildOptions
from fim_linops.statistics import Sums
from fim_linops.structures import Structure


@dataclass
class BuildContext:
    """What a builder needs: the engine (model, layout, likelihood, columns), the data, where and
    in which precision the statistics live, and the build's :class:`BuildOptions` (``progress``,
    ``rank``, ``kfac_approx``, ...).

    ``results()`` runs the data through the engine (one forward and one batched backward per batch)
    and may be called more than once (e.g. EKFAC's second pass)."""

    engine: Engine
    data: Any
    device: torch.device
    dtype: torch.dtype
    options: BuildOptions
    group: Any = None  # torch.distributed process group, None in a single process

    @property
    def progress(self) -> bool:
        return self.options.progress

    @property
    def rank(self) -> int | None:
        return self.options.rank

    def reduce(self, sums: Sums) -> Sums:
        """All-reduce the sums and the example count over the process group (once per build)."""
        all_reduce_(sums.tensors, self.group)
        sums.n = all_reduce_count(sums.n, self.group, self.device)
        return sums

    def results(self, columns: list | None = None) -> Generator[BatchResult, None, None]:
        """The batches' results, one per chunk of their columns (``Engine.run(stream=True)``:
        every statistic is a sum over the columns)."""
        return self.engine.run(
            self.data, self.device, self.dtype, progress=self.progress, columns=columns, stream=True
        )


def kron_spec(rb: RuledBlock, left_is_a: bool = False) -> KronSpec:
    """The Kronecker view (groups, rows, cols; weight/bias columns) of one ruled block."""
    groups, rows, cols = rb.rule.kron_shape(rb.module, rb.block.local_names)
    flags = rb.rule.kron_flags(rb.block.local_names)
    return KronSpec(
        rb.block.module_name,
        rb.block.start,
        rb.block.stop,
        groups,
        rows,
        cols,
        has_weight=flags[0],
        has_bias=flags[1],
        left_is_a=left_is_a,
        kernel=rb.rule.kron_kernel(rb.module),
    )


@dataclass
class RecordingContext(BuildContext):
    """The same context, recording each batch's back-propagated columns (e.g. sampled MC labels)
    into ``store`` on the way, so that a second pass (``results(columns=store)``) sees the same
    columns as the first."""

    store: list[torch.Tensor] | None = None

    @classmethod
    def of(cls, ctx: BuildContext, store: list[torch.Tensor] | None) -> RecordingContext:
        return cls(**{f.name: getattr(ctx, f.name) for f in fields(ctx)}, store=store)

    def results(self, columns: list | None = None) -> Generator[BatchResult, None, None]:
        for res in super().results(columns):
            if self.store is not None:  # one entry per batch: its chunks' columns joined
                if res.first:
                    self.store.append(res.v)
                else:
                    self.store[-1] = torch.cat([self.store[-1], res.v])
            yield res
            del res  # release this batch before the engine makes the next


Builder = Callable[[BuildContext], FisherOperator]
BUILDERS: dict[Structure, Builder] = {}


def register(structure: Structure) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        BUILDERS[structure] = fn
        return fn

    return deco
