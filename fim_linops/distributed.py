"""Across processes with torch.distributed: each rank reads its own shard of the data, and the
statistics (sums and example counts) are all-reduced once at the end; implicit products are
all-reduced per product. No transport of our own: ``torch.distributed.all_reduce``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def resolve_group(process_group: Any = None) -> Any:
    """The process group to reduce over: the one passed, the default one when torch.distributed
    is initialised, else None (single process)."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def all_reduce_(tensors: list[Tensor], group: Any) -> list[Tensor]:
    """Sum each tensor over the ranks, in place (no-op without a group).

    A non-contiguous tensor (e.g. an einsum's permuted result) is reduced through a contiguous
    copy written back: the gloo backend would otherwise reduce a temporary and leave ``t`` as it
    was, this rank's sum only."""
    if group is None:
        return tensors
    for t in tensors:
        if t.is_contiguous():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        else:
            flat = t.contiguous()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            t.copy_(flat)
    return tensors


def any_rank(flag: bool, group: Any, device: torch.device) -> bool:
    """Whether ``flag`` holds on at least one rank (every rank gets the same answer)."""
    if group is None:
        return flag
    t = torch.tensor([float(flag)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def all_gather_rows(t: Tensor, group: Any) -> Tensor:
    """The rows of ``t`` (m_r, *rest) of every rank, concatenated in rank order (m_r may differ
    between ranks: the row counts are gathered first and each rank's rows padded to the largest)."""
    if group is None:
        return t
    world = dist.get_world_size(group)
    count = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]  # once per build, not in a hot path
    padded = t.new_zeros(max(sizes), *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:m] for p, m in zip(parts, sizes, strict=True)])


def broadcast_(t: Tensor, group: Any) -> Tensor:
    """Rank 0's ``t`` on every rank, in place (no-op without a group)."""
    if group is not None:
        dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return t


def all_reduce_count(n: int, group: Any, device: torch.device) -> int:
    """Sum an integer count over the ranks (one small reduction at the end of a build)."""
    if group is None:
        return n
    t = torch.tensor(
        [n], dtype=torch.float64 if device.type == "cpu" else torch.float64, device=device
    )
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.round().long())
