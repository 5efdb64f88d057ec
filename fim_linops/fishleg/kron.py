r"""Kronecker parameterisations of one layer's block of Q ~ (F + gamma I)^-1, and their roots.

Over the row-major matrix view U = [W | b] (rows = out, cols = in + has_bias; see
:mod:`fim_linops.fishleg.layer_view`):

* ``KronQ``:      Q = R^T R kron L L^T,            Q vec(U) = vec(R^T R U L L^T);
* ``KronDiagQ``:  Q = D (R^T R kron L L^T) D,      Q vec(U) = d * vec(R^T R (d * U) L L^T),

with R (rows x rows), L (cols x cols) and d (rows x cols) the diagonal of D. Both are symmetric PSD
for any R, L, d. A product with k columns costs O(rows^3 + cols^3 + k (rows^2 cols + rows cols^2)).
Exact root: S = P^T D (R^T kron L) (P the fixed public <-> row-major reordering), S S^T = Q.

Shared with :mod:`fim_linops.operators`: the layout (a one-group
:class:`~fim_linops.operators.kron.KronSpec`) and the Kronecker product and diagonal of KFAC
(:func:`~fim_linops.operators.kron.kron_matmul`, :func:`~fim_linops.operators.kron.kron_diagonal`)
applied to the squared factors K = R^T R, M = L L^T. What stays apart, and why: these operators
are parameterised by the roots R, L (and d), and FishLeg's auxiliary loss differentiates through
them, so every product forms K and M from R and L inside autograd at each call; there is no
damping, no cached eigendecomposition and no detached factor as in
:class:`~fim_linops.operators.kfac.KFAC`, and PSD holds for any R, L with no symmetry check. The
root is R^T kron L itself, exact and differentiable without an eigendecomposition (KFAC's root goes
through its factors' eigenvectors), and D scales the view entrywise, which no operators/ structure
does.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator, RootLinearOperator
from torch import Tensor

from fim_linops.fishleg.layer_view import DenseByProducts, block_layout
from fim_linops.operators.base import as_columns, from_columns
from fim_linops.operators.kron import KronSpec, kron_diagonal, kron_matmul


def squares(R: Tensor, L: Tensor) -> tuple[Tensor, Tensor]:
    """The Kronecker factors of Q = K kron M: K = R^T R (rows, rows), M = L L^T (cols, cols)."""
    return R.mT @ R, L @ L.mT


def kron_qv(x: Tensor, R: Tensor, L: Tensor, d: Tensor | None, spec: KronSpec) -> Tensor:
    """Q x for public block columns x (M, k); differentiable in R, L, d."""
    K, M = squares(R, L)
    if d is None:
        return kron_matmul(spec, K, M, x)
    dp = spec.from_mat(d[None, None])  # (M, 1): d in public order
    return dp * kron_matmul(spec, K, M, dp * x)


def q_diagonal(R: Tensor, L: Tensor, d: Tensor | None, spec: KronSpec) -> Tensor:
    """diag(Q) (M,): (R^T R)_oo (L L^T)_cc d_oc^2 in public order."""
    # o: row (output), c: column (input); diag(R^T R)_o = sum_p R_po^2, diag(L L^T)_c = sum_e L_ce^2
    dq = kron_diagonal(spec, (R * R).sum(0)[None], (L * L).sum(1)[None])
    if d is not None:
        dq = dq * spec.from_mat((d * d)[None, None])[:, 0]
    return dq


def kron_root_mv(x: Tensor, R: Tensor, L: Tensor, d: Tensor, spec: KronSpec) -> Tensor:
    """S x = P^T D vec(R^T X L^T) for x (M, k) in row-major U order; result in public order."""
    u = x.mT.reshape(x.shape[-1], 1, spec.rows, spec.cols)  # (k, 1, rows, cols)
    return spec.from_mat((R.mT @ u @ L.mT) * d)


def kron_root_tmv(y: Tensor, R: Tensor, L: Tensor, d: Tensor, spec: KronSpec) -> Tensor:
    """S^T y = vec(R (D Y) L) for y (M, k) in public order; result in row-major U order."""
    z = R @ (spec.to_mat(y) * d) @ L  # (k, 1, rows, cols)
    return z.reshape(z.shape[0], -1).mT


class KronRoot(DenseByProducts):
    r"""S = P^T D (R^T kron L) of shape (M, M) (``transposed=True``: S^T), the root of a Kronecker Q."""

    def __init__(
        self, R: Tensor, L: Tensor, d: Tensor, *, has_bias: bool, transposed: bool = False
    ):
        super().__init__(R, L, d, has_bias=has_bias, transposed=transposed)
        self.R, self.L, self.d = R, L, d
        self.has_bias, self.transposed = has_bias, transposed
        self.spec = block_layout(R.shape[0], L.shape[0], has_bias)

    def _size(self) -> torch.Size:
        return torch.Size([self.spec.stop, self.spec.stop])

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        fn = kron_root_tmv if self.transposed else kron_root_mv
        return from_columns(fn(cols, self.R, self.L, self.d, self.spec), shape, vector)

    def _transpose_nonbatch(self) -> LinearOperator:
        return KronRoot(
            self.R, self.L, self.d, has_bias=self.has_bias, transposed=not self.transposed
        )


class KronQ(DenseByProducts):
    r"""Q = R^T R kron L L^T over row-major [W | b] of one layer (public order W, then b).

    Args:
        R: (rows, rows) = (out, out) output-side factor.
        L: (cols, cols) = (in + has_bias, in + has_bias) input-side factor.
        has_bias: whether the block ends with a bias (the last column of U).
    """

    def __init__(self, R: Tensor, L: Tensor, *, has_bias: bool):
        super().__init__(R, L, has_bias=has_bias)
        self.R, self.L, self.has_bias = R, L, has_bias
        self.spec = block_layout(R.shape[0], L.shape[0], has_bias)

    def _d(self) -> Tensor | None:
        return None

    def _size(self) -> torch.Size:
        return torch.Size([self.spec.stop, self.spec.stop])

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        return from_columns(kron_qv(cols, self.R, self.L, self._d(), self.spec), shape, vector)

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _diagonal(self) -> Tensor:
        return q_diagonal(self.R, self.L, self._d(), self.spec)

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
        self.spec = block_layout(R.shape[0], L.shape[0], has_bias)

    def _d(self) -> Tensor | None:
        return self.d
