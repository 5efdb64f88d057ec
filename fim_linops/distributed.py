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
    """Sum each tensor over the ranks, in place (no-op without a group)."""
    if group is None:
        return tensors
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return tensors


def all_reduce_count(n: int, group: Any, device: torch.device) -> int:
    """Sum an integer count over the ranks (one small reduction at the end of a build)."""
    if group is None:
        return n
    t = torch.tensor(
        [n], dtype=torch.float64 if device.type == "cpu" else torch.float64, device=device
    )
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.round().long())
