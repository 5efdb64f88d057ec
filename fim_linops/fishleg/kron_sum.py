r"""Sum of two Kronecker products for one layer's block of Q ~ (F + gamma I)^-1.

Over the row-major matrix view U = [W | b] (rows = out, cols = in + has_bias):

    Q = R1^T R1 kron L1 L1^T + R2^T R2 kron L2 L2^T,
    Q vec(U) = vec(R1^T R1 U L1 L1^T + R2^T R2 U L2 L2^T),

PSD for any factors; a product with k columns costs twice a Kronecker product. Exact root of
shape (M, 2M): S = [S1 | S2] with S_i = P^T (R_i^T kron L_i), so S S^T = Q. Each term is a
:mod:`fim_linops.fishleg.kron` term (the KFAC product of :mod:`fim_linops.operators.kron` on its
squared factors); it stays apart from :class:`~fim_linops.operators.kron_sum.KronSum` for the same
reason (lambda = the roots, differentiated through by the auxiliary loss).
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator, RootLinearOperator
from torch import Tensor

from fim_linops.fishleg.kron import kron_qv, kron_root_mv, kron_root_tmv, q_diagonal
from fim_linops.fishleg.layer_view import DenseByProducts, block_layout
from fim_linops.operators.base import as_columns, from_columns


class KronSumRoot(DenseByProducts):
    r"""S = [S1 | S2] of shape (M, 2M) (``transposed=True``: S^T, (2M, M)), S_i = P^T (R_i^T kron L_i)."""

    def __init__(
        self,
        R1: Tensor,
        L1: Tensor,
        R2: Tensor,
        L2: Tensor,
        *,
        has_bias: bool,
        transposed: bool = False,
    ):
        super().__init__(R1, L1, R2, L2, has_bias=has_bias, transposed=transposed)
        self.factors = (R1, L1, R2, L2)
        self.has_bias, self.transposed = has_bias, transposed
        self.spec = block_layout(R1.shape[0], L1.shape[0], has_bias)
        self._ones = torch.ones(R1.shape[0], L1.shape[0], dtype=R1.dtype, device=R1.device)

    def _size(self) -> torch.Size:
        m = self.spec.stop
        return torch.Size([2 * m, m]) if self.transposed else torch.Size([m, 2 * m])

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        R1, L1, R2, L2 = self.factors
        m, ones, spec = self.spec.stop, self._ones, self.spec
        if self.transposed:  # (2M, M): stack S1^T y over S2^T y
            out = torch.cat(
                [kron_root_tmv(cols, R1, L1, ones, spec), kron_root_tmv(cols, R2, L2, ones, spec)]
            )
        else:  # (M, 2M): S1 x[:M] + S2 x[M:]
            out = kron_root_mv(cols[:m], R1, L1, ones, spec) + kron_root_mv(
                cols[m:], R2, L2, ones, spec
            )
        return from_columns(out, shape, vector)

    def _transpose_nonbatch(self) -> LinearOperator:
        return KronSumRoot(*self.factors, has_bias=self.has_bias, transposed=not self.transposed)


class KronSumQ(DenseByProducts):
    r"""Q = R1^T R1 kron L1 L1^T + R2^T R2 kron L2 L2^T over row-major [W | b] of one layer.

    Args:
        R1: (rows, rows) output-side factor of the first term.
        L1: (cols, cols) input-side factor of the first term.
        R2: (rows, rows) output-side factor of the second term.
        L2: (cols, cols) input-side factor of the second term.
        has_bias: whether the block ends with a bias (the last column of U).
    """

    def __init__(self, R1: Tensor, L1: Tensor, R2: Tensor, L2: Tensor, *, has_bias: bool):
        super().__init__(R1, L1, R2, L2, has_bias=has_bias)
        self.factors = (R1, L1, R2, L2)
        self.has_bias = has_bias
        self.spec = block_layout(R1.shape[0], L1.shape[0], has_bias)

    def _size(self) -> torch.Size:
        return torch.Size([self.spec.stop, self.spec.stop])

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        R1, L1, R2, L2 = self.factors
        out = kron_qv(cols, R1, L1, None, self.spec) + kron_qv(cols, R2, L2, None, self.spec)
        return from_columns(out, shape, vector)

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _diagonal(self) -> Tensor:
        R1, L1, R2, L2 = self.factors
        return q_diagonal(R1, L1, None, self.spec) + q_diagonal(R2, L2, None, self.spec)

    def root_decomposition(self, method: str | None = None) -> RootLinearOperator:
        """Exact root S = [S1 | S2] of shape (M, 2M) with S S^T = Q."""
        return RootLinearOperator(KronSumRoot(*self.factors, has_bias=self.has_bias))
