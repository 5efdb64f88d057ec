r"""Which entries of the flat parameter vector each rank holds, and the collectives that move
vectors between "full" (P entries on every rank) and "sharded" (each rank its own entries).

An *ownership* is, per rank, a tuple of disjoint ``(start, stop)`` ranges of the public vector
order (``parameters_to_vector``); together the ranks own every entry exactly once. Two are used:

* :func:`param_ranges`, the FSDP2 layout: parameter ``p`` of shape (d0, ...) is split on dim 0 as
  ``torch.chunk(p, world)`` splits it (rank r: rows ``[r c, (r+1) c) ∩ [0, d0)`` with
  ``c = ceil(d0 / world)``; trailing ranks may get fewer rows or none). Dim-0 rows of a row-major
  tensor are contiguous, so each parameter contributes one range per rank: the rank's local
  ``DTensor`` shard, flattened. Parameters FSDP did not shard are split the same way.
* :func:`layer_ranges`, Kronecker blocks whole: each layer goes to one rank (greedy: the layer with
  the largest factors first, to the rank holding the fewest factor entries so far; ties to the
  lower rank), so that rank alone keeps its factors.

``pack(x, ranges)`` concatenates the rows ``x[start:stop]`` of a (P, M) block; ``unpack`` puts
them back into zeros. Since the ranks' ranges are disjoint, the sum over ranks of each rank's
``unpack`` is the full vector exactly (adding zeros is exact): :func:`combine` all-reduces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fim_linops.layout import ParamLayout
from fim_linops.operators.kron import KronSpec

Ranges = tuple[tuple[int, int], ...]
Ownership = tuple[Ranges, ...]  # indexed by rank within the group


def world_and_rank(group: Any) -> tuple[int, int]:
    """(world size, this process's rank) within ``group``; (1, 0) without a group."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def rows_of(d0: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s dim-0 rows ``[lo, hi)`` of a parameter with ``d0`` rows (torch.chunk)."""
    c = -(-d0 // world)
    return min(rank * c, d0), min((rank + 1) * c, d0)


def param_ranges(layout: ParamLayout, world: int) -> Ownership:
    """Per rank, its FSDP2 dim-0 shard of every parameter as ranges of the flat vector."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for e in layout.entries:
        d0 = e.shape[0] if len(e.shape) else 1
        row = e.numel // max(d0, 1)
        for r in range(world):
            lo, hi = rows_of(d0, world, r)
            if hi > lo:
                out[r].append((e.start + lo * row, e.start + hi * row))
    return tuple(tuple(r) for r in out)


def layer_owners(specs: Sequence[KronSpec], world: int) -> tuple[int, ...]:
    """The rank that keeps each Kronecker block: greedy balance of the factor entries
    groups (rows^2 + cols^2), largest first, ties to the lower rank and the earlier layer."""
    load = [0] * world
    owners = [0] * len(specs)
    cost = [s.groups * (s.rows**2 + s.cols**2) for s in specs]
    for i in sorted(range(len(specs)), key=lambda i: (-cost[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += cost[i]
    return tuple(owners)


def layer_ranges(specs: Sequence[KronSpec], owners: Sequence[int], world: int) -> Ownership:
    out: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for s, r in zip(specs, owners, strict=True):
        out[r].append((s.start, s.stop))
    return tuple(tuple(r) for r in out)


def count(ranges: Ranges) -> int:
    return sum(hi - lo for lo, hi in ranges)


def pack(x: Tensor, ranges: Ranges) -> Tensor:
    """(P, ...) -> (n_owned, ...): the rows of ``ranges``, concatenated (a new tensor)."""
    if not ranges:
        return x.new_zeros((0, *x.shape[1:]))
    return torch.cat([x[lo:hi] for lo, hi in ranges], dim=0)


def unpack(x: Tensor, ranges: Ranges, numel: int) -> Tensor:
    """(n_owned, ...) -> (P, ...): the rows put back at ``ranges``, zeros elsewhere."""
    out = x.new_zeros((numel, *x.shape[1:]))
    offset = 0
    for lo, hi in ranges:
        out[lo:hi] = x[offset : offset + hi - lo]
        offset += hi - lo
    return out


def combine(partial: Tensor, group: Any) -> Tensor:
    """Sum over the ranks of their ``unpack``-ed parts: the full tensor (disjoint parts: exact)."""
    if group is not None:
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    return partial


def _global(group: Any, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not dist.group.WORLD else rank


def reduce_to_owners(full: Tensor, ownership: Ownership, group: Any) -> Tensor:
    """Reduce-scatter with uneven parts: the sum over the ranks of ``full`` (P, ...), of which
    each rank receives only its own ranges (packed). One ``dist.reduce`` per rank of that rank's
    part, so the bytes sent equal those of a reduce-scatter and no rank ever holds the summed
    full tensor; it works on every backend (gloo has no uneven reduce-scatter)."""
    world, me = world_and_rank(group)
    if group is None:
        return pack(full, ownership[0])
    mine = full.new_zeros(0)
    for r in range(world):
        part = pack(full, ownership[r])  # a copy: reduce may overwrite it on non-owners
        dist.reduce(part, dst=_global(group, r), op=dist.ReduceOp.SUM, group=group)
        if r == me:
            mine = part
    return mine


def gather_full(local: Tensor, ownership: Ownership, numel: int, group: Any) -> Tensor:
    """All-gather with uneven parts: each rank's packed ``local`` (n_r, ...) -> the full (P, ...)
    on every rank (parts padded to the largest for ``all_gather``)."""
    world, me = world_and_rank(group)
    if group is None:
        return unpack(local, ownership[0], numel)
    longest = max(count(r) for r in ownership)
    pad = local.new_zeros((longest, *local.shape[1:]))
    pad[: local.shape[0]] = local
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad.contiguous(), group=group)
    out = local.new_zeros((numel, *local.shape[1:]))
    for r in range(world):
        offset = 0
        for lo, hi in ownership[r]:
            out[lo:hi] = parts[r][offset : offset + hi - lo]
            offset += hi - lo
    return out
