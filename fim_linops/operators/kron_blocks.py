r"""What KFAC, EKFAC and KronSum share: a fixed number of tensors per Kronecker block.

Each of these operators is stored as ``per_spec`` tensors for every :class:`KronSpec` (KFAC: the
factors left (groups, rows, rows) and right (groups, cols, cols); EKFAC: q_left, q_right and the
scales (groups, rows, cols); KronSum: stacks of r left and r right factors), in ``specs`` order,
plus a scalar damping delta (the operator is F + delta I). The tensors are the constructor's
positional arguments (so ``.to()``, ``.double()``, autograd and pickling work as for any
LinearOperator); P is the last spec's stop. Scaling the operator by c scales one tensor of each
block (``scaled_slot``: a left factor, or EKFAC's scales) and the damping.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from fim_linops.operators.kron import KronSpec


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
