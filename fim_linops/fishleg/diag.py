r"""Diagonal parameterisation of Q for parameters without a Kronecker structure.

Q = diag(s)^2 = diag(s * s): PSD for any s (P_block,); root diag(|s|).
"""

from __future__ import annotations

import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator, RootLinearOperator
from torch import Tensor

from fim_linops.operators.base import as_columns, from_columns


def diag_qv(x: Tensor, s: Tensor) -> Tensor:
    """Q x = s^2 * x for block columns x (M, k); differentiable in s."""
    return (s * s)[:, None] * x


class DiagQ(LinearOperator):
    r"""Q = diag(s * s) for one block of parameters (s of shape (M,))."""

    def __init__(self, s: Tensor):
        super().__init__(s)
        self.s = s

    def _size(self) -> torch.Size:
        return torch.Size([self.s.shape[0], self.s.shape[0]])

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        return from_columns(diag_qv(cols, self.s), shape, vector)

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _diagonal(self) -> Tensor:
        return self.s * self.s

    def to_dense(self) -> Tensor:
        return torch.diag(self.s * self.s)

    def root_decomposition(self, method: str | None = None) -> RootLinearOperator:
        """Exact root diag(|s|)."""
        return RootLinearOperator(DiagLinearOperator(self.s.abs()))
