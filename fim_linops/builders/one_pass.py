"""Several structures from one data pass: a per-layer mix whose groups are all one-pass structures
(diag, block_diag, dense, kfac) runs the engine once over the union of the groups' layers and feeds
each batch to every group's statistic through an :class:`EngineView` (the group's layers in the
group's own coordinates). The MC columns are drawn once, so the groups see the same samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fim_linops import statistics
from fim_linops.builders.base import BuildContext
from fim_linops.builders.core import (
    block_diag_operator,
    dense_operator,
    diag_operator,
    kfac_from_sums,
)
from fim_linops.engine import BatchResult, Engine
from fim_linops.engine.view import EngineView
from fim_linops.layout import ParamLayout
from fim_linops.operators.base import FisherOperator
from fim_linops.statistics import Sums
from fim_linops.structures import Structure

Statistic = Callable[[Engine, Iterable[BatchResult], Sums | None], Sums]
Finish = Callable[[BuildContext, Engine, Sums], FisherOperator]


def _kfac_statistic(reduce: bool) -> Statistic:
    def stat(engine: Engine, results: Iterable[BatchResult], into: Sums | None) -> Sums:
        return statistics.kfac_sums(engine, results, reduce=reduce, into=into)

    return stat


def _plan(structure: Structure, reduce: bool) -> tuple[Statistic, Finish]:
    return {
        Structure.DIAG: (statistics.diag_sums, diag_operator),
        Structure.BLOCK_DIAG: (statistics.block_sums, block_diag_operator),
        Structure.DENSE: (statistics.dense_sums, dense_operator),
        Structure.KFAC: (_kfac_statistic(reduce), kfac_from_sums),
    }[structure]


#: the structures whose statistics are sums over the batches of one engine pass
ONE_PASS = frozenset({Structure.DIAG, Structure.BLOCK_DIAG, Structure.DENSE, Structure.KFAC})


@dataclass
class Group:
    structure: Structure
    layout: ParamLayout  # the group's layers, in the group's own flat order


def build_one_pass(ctx: BuildContext, groups: list[Group]) -> list[FisherOperator]:
    """One operator per group (in the group's coordinates) from one pass of ``ctx.engine``."""
    reduce = ctx.options.kfac_approx == "reduce"
    views = [EngineView(ctx.engine, g.layout) for g in groups]
    plans = [_plan(g.structure, reduce) for g in groups]
    totals: list[Sums | None] = [None] * len(groups)
    for res in ctx.results():
        for gi, (view, (stat, _)) in enumerate(zip(views, plans, strict=True)):
            totals[gi] = stat(view, [view.result(res)], totals[gi])  # continued in place
        del res  # release this batch before the engine makes the next
    ops = []
    for view, (_, finish), total in zip(views, plans, totals, strict=True):
        assert total is not None, "fisher() rejects empty data before building"
        ops.append(finish(ctx, view, total))
    return ops
