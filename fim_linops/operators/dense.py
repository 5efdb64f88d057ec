r"""Dense Fisher: the full (P, P) matrix F = 1/N sum_n J_n^T H_n J_n.

Stored: F (P x P) and, once needed, its eigendecomposition F = Q diag(lambda) Q^T (cached).
Products O(P^2 M); solve, log-determinant, root and powers through the eigendecomposition, damping
exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fim_linops.operators.base import EigenOperator, pinv_scale, sym_eigh


class Dense(EigenOperator):
    structure = "dense"

    def __init__(self, matrix: Tensor, *, damping: Tensor | None = None):
        if damping is None:
            damping = torch.zeros((), dtype=matrix.dtype, device=matrix.device)
        super().__init__(matrix, damping=damping)
        self.matrix = matrix

    def _numel(self) -> int:
        return self.matrix.shape[-1]

    def _scaled(self, c: Tensor) -> Dense:
        return Dense(self.matrix * c, damping=self.damping * c)

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        return self.matrix @ rhs

    def _diagonal_undamped(self) -> Tensor:
        return self.matrix.diagonal()

    def _frobenius_sq_undamped(self) -> Tensor:
        return (self.matrix**2).sum()

    def to_dense(self) -> Tensor:
        return self.matrix + self.damping * torch.eye(
            self._numel(), dtype=self.dtype, device=self.device
        )

    def _eig(self) -> tuple[Tensor, Tensor]:
        cache = self.__dict__.setdefault("_fl_cache", {})
        if "eig" not in cache:
            cache["eig"] = sym_eigh(self.matrix)
        return cache["eig"]

    def _eig_apply(self, rhs: Tensor, fn) -> Tensor:
        lam, q = self._eig()
        return q @ (fn(lam + self.damping)[:, None] * (q.T @ rhs))

    def _eigenvalues(self) -> Tensor:
        return self._eig()[0] + self.damping

    def _eigenvectors(self) -> Tensor:
        return self._eig()[1]

    def _root_tensor(self) -> Tensor:
        lam, q = self._eig()
        return q * (lam + self.damping).clamp_min(0).sqrt()

    def _root_inv_tensor(self) -> Tensor:
        lam, q = self._eig()
        return q * pinv_scale(lam + self.damping, -0.5)
