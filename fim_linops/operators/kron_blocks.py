r"""What KFAC, EKFAC and KronSum share: a fixed number of tensors per Kronecker block.

Each of these operators is stored as ``per_spec`` tensors for every :class:`KronSpec` (KFAC: the
factors left (groups, rows, rows) and right (groups, cols, cols); EKFAC: q_left, q_right and the
scales (groups, rows, cols); KronSum: stacks of r left and r right factors), in ``specs`` order,
plus a scalar damping delta (the operator is F + delta I). The tensors are the constructor's
positional arguments (so ``.to()``, ``.double()``, autograd and pickling work as for any
LinearOperator); P is the last spec's stop. Scaling the operator by c scales one tensor of each
block (``scaled_slot``: a left factor, or EKFAC's scales) and the damping.

KFAC and EKFAC also share their eigenvectors: per block Q_L kron Q_R (orthogonal, groups apart),
with damped eigenvalues lambda (groups, rows, cols) in that basis (KFAC: lambda_L[i] lambda_R[j]
+ delta; EKFAC: the refitted scales + delta), so that eigenvectors, roots and inverse roots are
:class:`KronBasis` operators of (Q_L, Q_R, a scale per eigenvalue) (:class:`KronEigenOperator`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from fim_linops.operators.base import EigenOperator, pinv_scale
from fim_linops.operators.kron import KronBasis, KronSpec


class KronBlocks:
    """Mixin placed before the LinearOperator base: construction, P, the tensors of each block and
    scaling, for an operator of ``per_spec`` tensors per Kronecker block spec."""

    #: how many tensors each block spec has
    per_spec: int = 2
    #: which of a block's tensors carries a scale factor c (F -> c F)
    scaled_slot: int = 0
    #: what each block spec needs, for the error of a wrong number of tensors
    needs: str = "a (left, right) factor pair"

    damping: Tensor

    def __init__(
        self, *tensors: Tensor, specs: tuple[KronSpec, ...], damping: Tensor | None = None
    ):
        if len(tensors) != self.per_spec * len(specs):
            raise ValueError(f"{type(self).__name__} needs {self.needs} per block spec")
        if damping is None:
            damping = torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device)
        super().__init__(*tensors, specs=tuple(specs), damping=damping)  # type: ignore[call-arg]
        self.tensors = tensors
        self.specs = tuple(specs)

    def _numel(self) -> int:
        return self.specs[-1].stop

    def blocks(self) -> Iterator[tuple[Any, ...]]:
        """(spec, its ``per_spec`` tensors) per block, in ``specs`` order."""
        k = self.per_spec
        for i, spec in enumerate(self.specs):
            yield spec, *self.tensors[k * i : k * i + k]

    def _scaled(self, c: Tensor) -> Any:
        k, slot = self.per_spec, self.scaled_slot
        t = [x * c if i % k == slot else x for i, x in enumerate(self.tensors)]
        return type(self)(*t, specs=self.specs, damping=self.damping * c)


def trace_of_pairs(pairs: Iterator[tuple[Any, Tensor, Tensor]]) -> Tensor:
    """sum over the blocks (and the leading term/group dims) of tr(L) tr(R): the trace of
    sum L kron R, for (spec, left (..., rows, rows), right (..., cols, cols)) per block."""
    return sum(
        (left.diagonal(dim1=-2, dim2=-1).sum(-1) * right.diagonal(dim1=-2, dim2=-1).sum(-1)).sum()
        for _, left, right in pairs
    )  # type: ignore[return-value]  # a Tensor for one block or more


class KronEigenOperator(KronBlocks, EigenOperator):
    """A :class:`KronBlocks` operator with eigenvectors Q_L kron Q_R per block: subclasses give
    ``_eigenbases()`` (Q_L (groups, rows, rows), Q_R (groups, cols, cols)) and
    ``_block_eigenvalues()`` (per block the damped eigenvalues (p,) in the block's public order);
    the eigenvalues, eigenvectors, root and inverse root follow."""

    def _eigenbases(self) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def _block_eigenvalues(self) -> list[Tensor]:
        raise NotImplementedError

    def _eigenvalues(self) -> Tensor:
        return torch.cat(self._block_eigenvalues())

    def _basis(self, scales: list[Tensor]) -> KronBasis:
        tensors: list[Tensor] = []
        for (ql, qr), sc in zip(self._eigenbases(), scales, strict=True):
            tensors += [ql, qr, sc]
        return KronBasis(*tensors, specs=self.specs)

    def _eigenvectors(self) -> KronBasis:
        return self._basis([torch.ones_like(lam) for lam in self._block_eigenvalues()])

    def _root_tensor(self) -> KronBasis:
        return self._basis([lam.clamp_min(0).sqrt() for lam in self._block_eigenvalues()])

    def _root_inv_tensor(self) -> KronBasis:
        return self._basis([pinv_scale(lam, -0.5) for lam in self._block_eigenvalues()])
