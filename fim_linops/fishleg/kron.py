r"""Kronecker parameterisations of one layer's block of Q ~ (F + gamma I)^-1, and their roots.

Over the row-major matrix view U = [W | b] (rows = out, cols = in + has_bias; see
:mod:`fim_linops.fishleg.layer_view`):

* ``KronQ``:      Q = R^T R kron L L^T,            Q vec(U) = vec(R^T R U L L^T);
* ``KronDiagQ``:  Q = D (R^T R kron L L^T) D,      Q vec(U) = d * vec(R^T R (d * U) L L^T),

with R (rows x rows), L (cols x cols) and d (rows x cols) the diagonal of D. Both are symmetric PSD
for any R, L, d. A product with k columns costs O(k (rows^2 cols + rows cols^2)).
Exact root: S = P^T D (R^T kron L) (P the fixed public <-> row-major reordering), S S^T = Q.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator, RootLinearOperator
from torch import Tensor

from fim_linops.fishleg.layer_view import as_columns, from_columns, from_mat, to_mat


def kron_qv(x: Tensor, R: Tensor, L: Tensor, d: Tensor | None, has_bias: bool) -> Tensor:
    """Q x for public block columns x (M, k); differentiable in R, L, d."""
    u = to_mat(x, R.shape[0], L.shape[0], has_bias)  # (k, rows, cols)
    if d is not None:
        u = u * d
    z = R.mT @ (R @ u) @ L @ L.mT  # R^T R U L L^T, batched over k
    if d is not None:
        z = z * d
    return from_mat(z, has_bias)


def kron_diagonal(R: Tensor, L: Tensor, d: Tensor | None, has_bias: bool) -> Tensor:
    """diag(Q) (M,): (R^T R)_oo (L L^T)_cc d_oc^2 in public order."""
    # o: row (output), c: column (input); diag(R^T R)_o = sum_p R_po^2, diag(L L^T)_c = sum_e L_ce^2
    dq = torch.einsum("o,c->oc", (R * R).sum(0), (L * L).sum(1))
    if d is not None:
        dq = dq * d * d
    return from_mat(dq[None], has_bias)[:, 0]


def kron_root_mv(x: Tensor, R: Tensor, L: Tensor, d: Tensor, has_bias: bool) -> Tensor:
    """S x = P^T D vec(R^T X L^T) for x (M, k) in row-major U order; result in public order."""
    k = x.shape[-1]
    u = x.mT.reshape(k, R.shape[0], L.shape[0])
    return from_mat((R.mT @ u @ L.mT) * d, has_bias)


def kron_root_tmv(y: Tensor, R: Tensor, L: Tensor, d: Tensor, has_bias: bool) -> Tensor:
    """S^T y = vec(R (D Y) L) for y (M, k) in public order; result in row-major U order."""
    u = to_mat(y, R.shape[0], L.shape[0], has_bias) * d
    z = R @ u @ L
    return z.reshape(z.shape[0], -1).mT


class KronRoot(LinearOperator):
    r"""S = P^T D (R^T kron L) of shape (M, M) (``transposed=True``: S^T), the root of a Kronecker Q."""

    def __init__(
        self, R: Tensor, L: Tensor, d: Tensor, *, has_bias: bool, transposed: bool = False
    ):
        super().__init__(R, L, d, has_bias=has_bias, transposed=transposed)
        self.R, self.L, self.d = R, L, d
        self.has_bias, self.transposed = has_bias, transposed

    def _size(self) -> torch.Size:
        m = self.R.shape[0] * self.L.shape[0]
        return torch.Size([m, m])

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        fn = kron_root_tmv if self.transposed else kron_root_mv
        return from_columns(fn(cols, self.R, self.L, self.d, self.has_bias), shape, vector)

    def _transpose_nonbatch(self) -> LinearOperator:
        return KronRoot(
            self.R, self.L, self.d, has_bias=self.has_bias, transposed=not self.transposed
        )

    def to_dense(self) -> Tensor:
        eye = torch.eye(self.shape[-1], dtype=self.dtype, device=self.device)
        return self._matmul(eye)


class KronQ(LinearOperator):
    r"""Q = R^T R kron L L^T over row-major [W | b] of one layer (public order W, then b).

    Args:
        R: (rows, rows) = (out, out) output-side factor.
        L: (cols, cols) = (in + has_bias, in + has_bias) input-side factor.
        has_bias: whether the block ends with a bias (the last column of U).
    """

    def __init__(self, R: Tensor, L: Tensor, *, has_bias: bool):
        super().__init__(R, L, has_bias=has_bias)
        self.R, self.L, self.has_bias = R, L, has_bias

    def _d(self) -> Tensor | None:
        return None

    def _size(self) -> torch.Size:
        m = self.R.shape[0] * self.L.shape[0]
        return torch.Size([m, m])

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        return from_columns(kron_qv(cols, self.R, self.L, self._d(), self.has_bias), shape, vector)

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _diagonal(self) -> Tensor:
        return kron_diagonal(self.R, self.L, self._d(), self.has_bias)

    def to_dense(self) -> Tensor:
        eye = torch.eye(self.shape[-1], dtype=self.dtype, device=self.device)
        return self._matmul(eye)

    def _root(self) -> KronRoot:
        d = self._d()
        if d is None:
            d = torch.ones(self.R.shape[0], self.L.shape[0], dtype=self.dtype, device=self.device)
        return KronRoot(self.R, self.L, d, has_bias=self.has_bias)

    def root_decomposition(self, method: str | None = None) -> RootLinearOperator:
        """Exact root S = P^T D (R^T kron L) with S S^T = Q (no Lanczos, no Cholesky)."""
        return RootLinearOperator(self._root())


class KronDiagQ(KronQ):
    r"""Q = D (R^T R kron L L^T) D over row-major [W | b], D = diag(vec(d)), d of shape (rows, cols)."""

    def __init__(self, R: Tensor, L: Tensor, d: Tensor, *, has_bias: bool):
        LinearOperator.__init__(self, R, L, d, has_bias=has_bias)
        self.R, self.L, self.d, self.has_bias = R, L, d, has_bias

    def _d(self) -> Tensor | None:
        return self.d
