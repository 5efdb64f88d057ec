r"""A Fisher operator of which each rank holds a share: F = sum_r S_r^T F_r S_r.

S_r selects rank r's *owned* entries of the public vector (disjoint ranges, together all P
entries; see :mod:`fim_linops.sharding.shards`) and F_r is an ordinary structured operator on
them (``Diag`` over the rank's FSDP shards; ``KFAC`` / ``EKFAC`` over the rank's whole layers,
their block specs re-based to the packed entries). Since F is block-diagonal along the ownership,
every structural quantity is one local computation and one collective:

* full vectors (P, M): F v = sum_r S_r^T F_r S_r v, one all-reduce of P x M (each entry written by
  one rank: exact); solves, powers, eigenvalues and the diagonal likewise; logdet, trace and
  Frobenius norm are a scalar all-reduce;
* sharded vectors (the FSDP2 layout, :meth:`ShardedFisher.matmul_sharded`): when the ownership is
  the parameter layout (diag) no communication at all, else one all-gather of the input and one
  reduce-scatter of the output (the same bytes as FSDP's own parameter all-gather and gradient
  reduce-scatter of a step).

Every method that communicates is a collective: all ranks of the group call it, in the same
order, with the same shapes (as for a forward of the FSDP model).
"""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import EigenOperator, as_columns, from_columns, pinv_scale
from fim_linops.sharding import shards
from fim_linops.sharding.shards import Ownership


class _Scattered(LinearOperator):
    """sum_r S_r^T B_r S_r for a local operator B_r (roots and eigenvectors of a ShardedFisher)."""

    def __init__(self, local: Any, *, owned: Ownership, numel: int, group: Any, me: int):
        super().__init__(local, owned=owned, numel=numel, group=group, me=me)
        self.local, self.owned, self.numel_, self.group, self.me = local, owned, numel, group, me

    def _size(self) -> torch.Size:
        return torch.Size([self.numel_, self.numel_])

    def _transpose_nonbatch(self) -> LinearOperator:
        local = self.local.mT if self.local is not None else None
        return _Scattered(local, owned=self.owned, numel=self.numel_, group=self.group, me=self.me)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        ranges = self.owned[self.me]
        part = cols.new_zeros(cols.shape)
        if self.local is not None:
            part = shards.unpack(self.local @ shards.pack(cols, ranges), ranges, self.numel_)
        return from_columns(shards.combine(part, self.group), shape, vector)


class ShardedFisher(EigenOperator):
    r"""F = sum_r S_r^T F_r S_r with F_r (this rank's ``local`` operator) on the entries it owns.

    Args:
        tensors: the local operator's tensors (empty when this rank owns nothing).
        local_cls: the local operator's class (``Diag``, ``KFAC``, ``EKFAC``) or None.
        local_kwargs: its keyword arguments other than the damping (e.g. the re-based specs).
        owned: per rank, the ranges of the public vector it owns (this operator's layout).
        shards: per rank, its FSDP2 parameter shards (the layout of sharded vectors).
        numel: P.
        group: the process group (None: one process).
        me: this process's rank in ``group``.
        damping: scalar delta; the operator is F + delta I (held by every rank).
    """

    structure = "sharded"

    def __init__(
        self,
        *tensors: Tensor,
        local_cls: type | None,
        local_kwargs: dict[str, Any],
        owned: Ownership,
        shards: Ownership,
        numel: int,
        group: Any,
        me: int,
        damping: Tensor | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | None = None,
    ):
        if damping is None:
            damping = torch.zeros((), dtype=dtype, device=device)
        super().__init__(
            *tensors,
            local_cls=local_cls,
            local_kwargs=local_kwargs,
            owned=owned,
            shards=shards,
            numel=numel,
            group=group,
            me=me,
            damping=damping,
            dtype=dtype,
            device=device,
        )
        self.local_tensors = tensors
        self.owned, self.shards, self.numel_ = owned, shards, numel
        self.group, self.me = group, me
        self.local: EigenOperator | None = (
            local_cls(*tensors, **local_kwargs, damping=damping) if local_cls is not None else None
        )
        self.structure = getattr(local_cls, "structure", "sharded")
        #: the most statistic entries this rank held at once while the build's data pass ran
        #: (its share as it grew, plus the one layer's contribution being reduced; EKFAC: plus
        #: every layer's eigenbases in its second pass); 0 when unknown (a derived operator)
        self.pass_held = 0

    @property
    def dtype(self) -> torch.dtype:
        return self._kwargs["damping"].dtype

    @property
    def device(self) -> torch.device:
        return self._kwargs["damping"].device

    def _scaled(self, c: Tensor) -> ShardedFisher:
        """c (F + delta I) = c F + c delta I: each rank scales its local operator (no
        communication); ``fl.laplace.Laplace`` scales the mean Fisher to the summed GGN."""
        tensors = self.local_tensors
        if self.local is not None:
            tensors = tuple(self.local._scaled(c)._args)
        kwargs = dict(self._kwargs, damping=self.damping * c)
        return ShardedFisher(*tensors, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> ShardedFisher:
        """The same sharded operator with this rank's tensors (and the damping) moved or cast, as
        ``Tensor.to`` takes its arguments. A collective method of the result needs tensors on a
        device the process group's backend serves (gloo: CPU; NCCL: CUDA), on every rank."""
        moved = [t.to(*args, **kwargs) for t in self.local_tensors]
        damping = self.damping.to(*args, **kwargs)
        out_kwargs = dict(self._kwargs, damping=damping, dtype=damping.dtype, device=damping.device)
        return ShardedFisher(*moved, **out_kwargs)

    def double(self, device_id: Any = None) -> ShardedFisher:
        return self.to(torch.float64)

    def float(self, device_id: Any = None) -> ShardedFisher:
        return self.to(torch.float32)

    def __getstate__(self) -> dict[str, Any]:
        if self.group is not None:
            raise TypeError(
                f"cannot pickle a ShardedFisher of {len(self.owned)} ranks: it holds a process "
                "group and only this rank's share of F. Save each rank's part instead "
                "(F.local: its operator over the entries F.owned[F.me] of the parameter vector), "
                "or build the whole operator with fl.fisher (replicated) to pickle it"
            )
        return dict(self.__dict__)

    # -- what this rank holds ----------------------------------------------------------------
    def held_numel(self) -> int:
        """Entries of the tensors this rank keeps (the local operator's statistics)."""
        return sum(t.numel() for t in self.local_tensors)

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.local_tensors)

    # -- helpers ---------------------------------------------------------------------------------
    def _numel(self) -> int:
        return self.numel_

    def _mine(self) -> shards.Ranges:
        return self.owned[self.me]

    def _apply(self, cols: Tensor, local_fn) -> Tensor:
        """sum_r S_r^T local_fn(S_r cols): one all-reduce of (P, M)."""
        part = cols.new_zeros(cols.shape)
        if self.local is not None:
            part = shards.unpack(
                local_fn(shards.pack(cols, self._mine())), self._mine(), self.numel_
            )
        return shards.combine(part, self.group)

    def _vector(self, local_fn) -> Tensor:
        part = torch.zeros(self.numel_, dtype=self.dtype, device=self.device)
        if self.local is not None:
            part = shards.unpack(local_fn(), self._mine(), self.numel_)
        return shards.combine(part, self.group)

    def _scalar(self, local_fn) -> Tensor:
        s = torch.zeros((), dtype=self.dtype, device=self.device)
        if self.local is not None:
            s = s + local_fn()
        return shards.combine(s, self.group)

    # -- full vectors (P, M) ---------------------------------------------------------------------
    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        return self._apply(rhs, lambda x: self.local._matmul_undamped(x))  # type: ignore[union-attr]

    def _diagonal_undamped(self) -> Tensor:
        return self._vector(lambda: self.local._diagonal_undamped())  # type: ignore[union-attr]

    def _trace_undamped(self) -> Tensor:
        return self._scalar(lambda: self.local._trace_undamped())  # type: ignore[union-attr]

    def _frobenius_sq_undamped(self) -> Tensor:
        return self._scalar(lambda: self.local._frobenius_sq_undamped())  # type: ignore[union-attr]

    def _eig_apply(self, rhs: Tensor, fn) -> Tensor:
        return self._apply(rhs, lambda x: self.local._eig_apply(x, fn))  # type: ignore[union-attr]

    def _eigenvalues(self) -> Tensor:
        return self._vector(lambda: self.local._eigenvalues())  # type: ignore[union-attr]

    def logdet(self) -> Tensor:
        return self._scalar(lambda: self.local.logdet())  # type: ignore[union-attr]

    def _scattered(self, name: str) -> LinearOperator:
        local = getattr(self.local, name)() if self.local is not None else None
        return _Scattered(local, owned=self.owned, numel=self.numel_, group=self.group, me=self.me)

    def _eigenvectors(self) -> LinearOperator:
        return self._scattered("_eigenvectors")

    def _root_tensor(self) -> LinearOperator:
        return self._scattered("_root_tensor")

    def _root_inv_tensor(self) -> LinearOperator:
        return self._scattered("_root_inv_tensor")

    def to_dense(self) -> Tensor:
        """The P x P matrix on every rank (small models and tests only)."""
        return self._matmul(torch.eye(self.numel_, dtype=self.dtype, device=self.device))

    # -- sharded vectors (the FSDP2 layout) ------------------------------------------------------
    def shard(self, full: Tensor) -> Tensor:
        """Full (P, ...) -> this rank's parameter shards (n_local, ...), packed in the public
        order: the local tensors of the FSDP2 ``DTensor`` parameters, flattened."""
        return shards.pack(full, self.shards[self.me])

    def unshard(self, local: Tensor) -> Tensor:
        """This rank's parameter shards (n_local, ...) -> the full (P, ...) on every rank (an
        all-gather; a collective)."""
        return shards.gather_full(local, self.shards, self.numel_, self.group)

    def _sharded(self, local: Tensor, fn) -> Tensor:
        cols, shape, vector = as_columns(local)
        if self.owned == self.shards and self.local is not None:  # diag: no communication
            out = fn(cols)
        elif self.owned == self.shards:
            out = cols.new_zeros(cols.shape)
        else:
            full = self.unshard(cols)
            part = cols.new_zeros(full.shape)
            if self.local is not None:
                part = shards.unpack(fn(shards.pack(full, self._mine())), self._mine(), self.numel_)
            out = shards.reduce_to_owners(part, self.shards, self.group)
        return from_columns(out, shape, vector)

    def matmul_sharded(self, local: Tensor) -> Tensor:
        """(F + delta I) v with v and the result in this rank's parameter shards, (n_local,) or
        (n_local, M); a collective except for diag."""
        return self._sharded(local, lambda x: self.local._matmul(x))  # type: ignore[union-attr]

    def solve_sharded(self, local: Tensor) -> Tensor:
        """(F + delta I)^-1 v (pseudo-inverse when singular), sharded like :meth:`matmul_sharded`."""
        return self._sharded(
            local,
            lambda x: self.local._eig_apply(x, lambda lam: pinv_scale(lam, -1.0)),  # type: ignore[union-attr]
        )

    def describe(self) -> str:
        held = self.held_numel()
        return (
            f"ShardedFisher({self.structure}, P={self.numel_}): rank {self.me} of "
            f"{len(self.owned)} owns {shards.count(self._mine())} entries and keeps {held} "
            "statistics entries"
        )

    def __repr__(self) -> str:
        return f"ShardedFisher({self.structure}, P={self.numel_}, rank={self.me})"
