r"""Diagonal Fisher: F ~ diag(d), d_i = 1/N sum_n sum_k (J_n^T V[k, n])_i^2.

Stored: d (P,). Everything elementwise and exact, damping included.
"""

from __future__ import annotations

import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator
from torch import Tensor

from fim_linops.operators.base import EigenOperator, pinv_scale


class Diag(EigenOperator):
    structure = "diag"

    def __init__(self, diag: Tensor, *, damping: Tensor | None = None):
        if damping is None:
            damping = torch.zeros((), dtype=diag.dtype, device=diag.device)
        super().__init__(diag, damping=damping)
        self.diag = diag

    def _numel(self) -> int:
        return self.diag.shape[-1]

    def _scaled(self, c: Tensor) -> Diag:
        return Diag(self.diag * c, damping=self.damping * c)

    def add_diagonal(self, diag: Tensor | float) -> LinearOperator:
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        if diag.numel() > 1:
            return Diag(self.diag + diag, damping=self.damping)
        return super().add_diagonal(diag)

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        return self.diag[:, None] * rhs

    def _diagonal_undamped(self) -> Tensor:
        return self.diag

    def _frobenius_sq_undamped(self) -> Tensor:
        return (self.diag**2).sum()

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag + self.damping)

    def _eig_apply(self, rhs: Tensor, fn) -> Tensor:
        return fn(self.diag + self.damping)[:, None] * rhs

    def _eigenvalues(self) -> Tensor:
        return self.diag + self.damping

    def _eigenvectors(self) -> LinearOperator:
        return DiagLinearOperator(torch.ones_like(self.diag))

    def _root_tensor(self) -> LinearOperator:
        return DiagLinearOperator((self.diag + self.damping).clamp_min(0).sqrt())

    def _root_inv_tensor(self) -> LinearOperator:
        return DiagLinearOperator(pinv_scale(self.diag + self.damping, -0.5))
