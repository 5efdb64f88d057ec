"""Builders of the core structures: diag, block_diag, dense, kfac, implicit."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fim_linops import positions, statistics
from fim_linops.builders.base import BuildContext, kron_spec, register
from fim_linops.data import iter_batches
from fim_linops.distributed import all_reduce_count
from fim_linops.engine import Engine, FisherType
from fim_linops.engine.engine import HALF
from fim_linops.engine.rules.base import KronStats
from fim_linops.operators import KFAC, BlockDiag, Dense, Diag, Implicit, KronSpec
from fim_linops.structures import Structure

# Each one-pass structure is a statistic over the batches (statistics.py) and an operator made
# from its sums (``*_operator(ctx, engine, sums)``, which also all-reduces them across processes);
# builders/one_pass.py feeds several of them from one engine pass.


def diag_operator(ctx: BuildContext, engine: Engine, sums: statistics.Sums) -> Diag:
    sums = ctx.reduce(sums)
    return Diag(sums.tensors[0] / sums.n)


def block_diag_operator(ctx: BuildContext, engine: Engine, sums: statistics.Sums) -> BlockDiag:
    sums = ctx.reduce(sums)
    names = tuple(b.module_name for b in engine.layout.blocks)
    return BlockDiag(*[b / sums.n for b in sums.tensors], names=names)


def dense_operator(ctx: BuildContext, engine: Engine, sums: statistics.Sums) -> Dense:
    sums = ctx.reduce(sums)
    return Dense(sums.tensors[0] / sums.n)


@register(Structure.DIAG)
def build_diag(ctx: BuildContext) -> Diag:
    return diag_operator(ctx, ctx.engine, statistics.diag_sums(ctx.engine, ctx.results()))


@register(Structure.BLOCK_DIAG)
def build_block_diag(ctx: BuildContext) -> BlockDiag:
    return block_diag_operator(ctx, ctx.engine, statistics.block_sums(ctx.engine, ctx.results()))


@register(Structure.DENSE)
def build_dense(ctx: BuildContext) -> Dense:
    return dense_operator(ctx, ctx.engine, statistics.dense_sums(ctx.engine, ctx.results()))


@register(Structure.KFAC)
def build_kfac(ctx: BuildContext) -> KFAC:
    reduce = ctx.options.kfac_approx == "reduce"
    sums = statistics.kfac_sums(ctx.engine, ctx.results(), reduce=reduce)
    return kfac_from_sums(ctx, ctx.engine, sums)


def kfac_from_sums(ctx: BuildContext, engine: Engine, sums: statistics.Sums) -> KFAC:
    """The KFAC operator from the factor sums of :func:`statistics.kfac_sums` (all-reduced)."""
    stats = fill_kron_stats(engine, sums.extra["stats"], ctx.dtype, ctx.device)
    sums.tensors = [t for st in stats for t in (st.left_sum, st.right_sum)]
    sums.tensors.append(
        torch.tensor([float(st.a_rows) for st in stats], dtype=torch.float64, device=ctx.device)
    )
    ctx.reduce(sums)
    rows = sums.tensors[-1]
    sums.extra["stats"] = [
        KronStats(sums.tensors[2 * i], sums.tensors[2 * i + 1], int(rows[i]), st.left_is_a)
        for i, st in enumerate(stats)
    ]
    return kfac_operator(engine, sums)


def fill_kron_stats(
    engine: Engine, stats: list, dtype: torch.dtype, device: torch.device
) -> list[KronStats]:
    """Zero statistics for layers this process never reached (so every rank reduces the same
    tensors)."""
    out = []
    for rb, st in zip(engine.ruled, stats, strict=True):
        if st is None:
            st = rb.rule.zero_kron_stats(rb.module, rb.block.local_names, dtype, device)
        out.append(st)
    return out


@register(Structure.IMPLICIT)
def build_implicit(ctx: BuildContext) -> Implicit:
    return implicit_operator(ctx.engine, ctx.data, ctx.device, ctx.dtype, ctx.group)


def kfac_operator(engine: Engine, sums: statistics.Sums) -> KFAC:
    factors: list[Tensor] = []
    specs: list[KronSpec] = []
    for rb, st in zip(engine.ruled, sums.extra["stats"], strict=True):
        a_count = max(st.a_rows, 1)
        if st.left_is_a:
            left, right = st.left_sum / a_count, st.right_sum / sums.n
        else:
            left, right = st.left_sum / sums.n, st.right_sum / a_count
        factors += [left, right]
        specs.append(kron_spec(rb, st.left_is_a))
    return KFAC(*factors, specs=tuple(specs))


def implicit_operator(engine: Engine, data: Any, device, dtype, group: Any = None) -> Implicit:
    """Collect the batches (and, for MC/empirical, their fixed output columns)."""
    ftype = engine.fisher_type
    batches = []
    masks: list[Tensor | None] = []
    n = 0
    run_dtype = engine.model_dtype if engine.model_dtype in HALF else dtype
    for index, (x, y) in enumerate(iter_batches(data, device, run_dtype, True, engine.model)):
        cols, flat = None, None
        with torch.no_grad():
            f = engine.output(x, y, index)  # validates shapes, labels and finiteness
            mask = engine.mask(f, y, x)
            if ftype is not FisherType.EXACT:
                cols = engine.columns(f, y, index, x).to(f.dtype)
            elif mask is not None:
                flat = positions.flat_mask(mask, f.shape[1] // mask.shape[1])
        batches.append((x, cols))
        masks.append(flat)
        n += engine.count(f, mask)
    # a half model's snapshot is kept in the operator's dtype (float32), run in its own
    params = tuple(e.param.detach().clone().to(dtype) for e in engine.layout.entries)
    return Implicit(
        *params,
        model=engine.model,
        layout=engine.layout,
        batches=batches,
        likelihood=engine.likelihood,
        n_examples=all_reduce_count(n, group, device),
        group=group,
        masks=masks,
    )
