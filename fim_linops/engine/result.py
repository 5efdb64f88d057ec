r"""What the engine hands the statistics for one batch (or one chunk of its columns).

Shapes: K back-propagated columns (of this chunk), N examples, C outputs, p a block's parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from fim_linops.engine.columns import FUNC_COPIES, Columns
from fim_linops.engine.ruled import RuledBlock
from fim_linops.engine.rules.base import CHUNK_BYTES, chunk_size
from fim_linops.layout import LayerBlock, ParamLayout

#: bytes of one temporary made from a slice of per-example tensors (:meth:`BatchResult.slices`):
#: a few of them stay small beside the column chunk
SLICE_BYTES = 1 << 24


class EngineLike(Protocol):
    """What a result reads of the engine that made it (:class:`~fim_linops.engine.Engine`)."""

    layout: ParamLayout
    ruled: list[RuledBlock]
    fallback: list[LayerBlock]
    block_kind: dict[int, tuple[str, int]]
    max_bytes: int | None

    def functional_grads(self, x: Any, v: Tensor, lo: int, hi: int) -> dict[str, Tensor]: ...


@dataclass
class BatchResult:
    """What one batch produced: example count, the calls (a, g) per ruled block, and a closure for
    per-example gradients of the torch.func blocks."""

    n: int
    k: int
    calls: dict[int, list[tuple[Tensor, Tensor]]]  # index into engine.ruled -> [(a, g)]
    x: Any
    v: Tensor  # (K, N, C) back-propagated columns
    engine: EngineLike  # the Engine that made it
    #: what the batch adds to the normaliser: its examples (positions="sum") or its kept
    #: positions (positions="mean"); 0 for every column chunk of a batch but its first
    count: int = -1
    #: whether this is the batch's first (or only) column chunk: statistics that do not depend
    #: on the columns (KFAC's input factor A and its row count) are added from it alone
    first: bool = True

    def __post_init__(self) -> None:
        if self.count < 0:
            self.count = self.n

    def block_grads(self, i: int, lo: int, hi: int) -> Tensor:
        """Per-example gradients (K, hi-lo, p) of ruled block i for examples lo:hi."""
        rb = self.engine.ruled[i]
        out = None
        for a, g in self.calls.get(i, []):
            part = rb.rule.grads(rb.module, a[lo:hi], g[:, lo:hi], rb.block.local_names)
            out = part if out is None else out + part
        if out is None:  # the layer was not reached by the output: zero gradient
            out = torch.zeros(
                self.k, hi - lo, rb.block.numel, dtype=self.v.dtype, device=self.v.device
            )
        return out

    def fallback_grads(self, lo: int, hi: int) -> dict[str, Tensor]:
        """Per-example gradients name -> (K, hi-lo, *shape) of the torch.func parameters."""
        return self.engine.functional_grads(self.x, self.v, lo, hi)

    def all_block_grads(self, lo: int, hi: int) -> list[Tensor]:
        """Per-example gradients (K, hi-lo, p_b) of every layout block, in the public order."""
        fb = self.fallback_grads(lo, hi) if self.engine.fallback else {}
        out = []
        for bi, block in enumerate(self.engine.layout.blocks):
            kind, idx = self.engine.block_kind[bi]
            if kind == "ruled":
                out.append(self.block_grads(idx, lo, hi))
            else:
                out.append(
                    torch.cat(
                        [fb[e.name].reshape(self.k, hi - lo, -1) for e in block.entries], dim=-1
                    )
                )
        return out

    def chunks(self, p: int, func: bool = False) -> Iterator[tuple[int, int]]:
        """Example ranges so that (K, n, p) tensors stay within the memory budget: the engine's
        ``max_bytes`` (at most 256 MiB; one example at least, whose (K, 1, p) the engine's column
        chunks keep within ``max_bytes``). ``func``: the chunk also makes the torch.func
        per-example gradients (:meth:`fallback_grads`), whose workspace is
        :data:`~fim_linops.engine.columns.FUNC_COPIES` times theirs (p counts them once)."""
        if func:
            p += (FUNC_COPIES - 1) * sum(b.numel for b in self.engine.fallback)
        budget = CHUNK_BYTES if self.engine.max_bytes is None else self.engine.max_bytes
        step = chunk_size(self.k, self.n, p, self.v.element_size(), min(budget, CHUNK_BYTES))
        for lo in range(0, self.n, step):
            yield lo, min(self.n, lo + step)

    def slices(self, rows: int, per_row: int) -> range:
        """Starts of slices of ``rows`` rows (the K columns of a chunk, or its K n
        column-example pairs) such that a (slice, per_row) temporary stays within
        :data:`SLICE_BYTES` and an eighth of ``max_bytes``; slice ``[lo, lo + step)`` with
        ``step`` the range's (one row at least). For statistics that form several temporaries
        from per-example tensors the column chunk counts once (EKFAC's projections, the
        Kronecker sums' products, the quasi-diagonal's cross terms)."""
        budget = SLICE_BYTES if self.engine.max_bytes is None else self.engine.max_bytes // 8
        per = max(1, per_row * self.v.element_size())
        return range(0, rows, int(max(1, min(rows, min(budget, SLICE_BYTES) // per))))


@dataclass
class Pending:
    """A batch after its forward: output f (N, C), input, calls (ruled index, a, output) and
    columns, waiting for its backward passes."""

    f: Tensor
    x: Any
    calls: list[tuple[int, Tensor, Tensor]]
    cols: Columns
    count: int


def join(parts: list[BatchResult]) -> BatchResult:
    """One batch's column chunks as one result: the columns and each call's g concatenated."""
    if len(parts) == 1:
        return parts[0]
    head = parts[0]
    calls = {
        i: [(a, torch.cat([p.calls[i][c][1] for p in parts])) for c, (a, _) in enumerate(cs)]
        for i, cs in head.calls.items()
    }
    v = torch.cat([p.v for p in parts])
    return BatchResult(head.n, v.shape[0], calls, head.x, v, head.engine, head.count)
