r"""Low-rank Fisher: F ~ U diag(lambda) U^T with U (P, k) orthonormal, the top-k eigenpairs.

Stored: U and lambda (k,). With damping delta the operator is U diag(lambda) U^T + delta I, whose
eigenvalues are lambda + delta on span(U) and delta on its complement, so every function of it is
exact (Woodbury in eigen form):

    f(F + delta I) = U diag(f(lambda + delta) - f(delta)) U^T + f(delta) I,

e.g. the solve (f = 1/x) costs O(P k) per column. Without damping, negative powers are
pseudo-inverses (zero on the complement). ``eigh`` returns all P eigenvalues and an orthogonal
eigenvector operator [U, U_perp] built from the Householder QR of U (``ormqr``), never a P x P
matrix.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import EigenOperator, as_columns, from_columns, pinv_scale


class LowRank(EigenOperator):
    r"""U diag(lambda) U^T (+ delta I).

    Args:
        u: (P, k) orthonormal columns.
        evals: (k,) eigenvalues >= 0.
        damping: scalar delta.
    """

    structure = "lowrank"

    def __init__(self, u: Tensor, evals: Tensor, *, damping: Tensor | None = None):
        if u.ndim != 2 or evals.shape != u.shape[-1:]:
            raise ValueError(
                f"LowRank needs U (P, k) and lambda (k,), got {tuple(u.shape)} and {tuple(evals.shape)}"
            )
        if damping is None:
            damping = torch.zeros((), dtype=u.dtype, device=u.device)
        super().__init__(u, evals, damping=damping)
        self.u = u
        self.evals = evals

    @property
    def rank(self) -> int:
        return self.u.shape[-1]

    def _numel(self) -> int:
        return self.u.shape[0]

    def _scaled(self, c: Tensor) -> LowRank:
        return LowRank(self.u, self.evals * c, damping=self.damping * c)

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        return self.u @ (self.evals[:, None] * (self.u.T @ rhs))

    def _diagonal_undamped(self) -> Tensor:
        return (self.u**2) @ self.evals

    def _trace_undamped(self) -> Tensor:
        return self.evals.sum()

    def _frobenius_sq_undamped(self) -> Tensor:
        return (self.evals**2).sum()

    def quad_exact(self, v: Tensor) -> Tensor:
        return (self.evals * (self.u.T @ v) ** 2).sum() + self.damping * (v * v).sum()

    def to_dense(self) -> Tensor:
        eye = torch.eye(self._numel(), dtype=self.dtype, device=self.device)
        return (self.u * self.evals) @ self.u.T + self.damping * eye

    # -- eigen structure -------------------------------------------------------------------------
    def _spectrum(self, fn) -> tuple[Tensor, Tensor]:
        """fn on (lambda + delta) and on delta, evaluated together (one pseudo-inverse tolerance)."""
        vals = fn(torch.cat([self.evals + self.damping, self.damping.reshape(1)]))
        return vals[:-1], vals[-1]

    def _eig_apply(self, rhs: Tensor, fn) -> Tensor:
        fk, f0 = self._spectrum(fn)
        return self.u @ ((fk - f0)[:, None] * (self.u.T @ rhs)) + f0 * rhs

    def _eigenvalues(self) -> Tensor:
        rest = self.damping.expand(self._numel() - self.rank)
        return torch.cat([self.evals + self.damping, rest])

    def _householder(self) -> tuple[Tensor, Tensor, Tensor]:
        """Householder QR of U: (reflectors, tau, d) with U = Q[:, :k] diag(d[:k]), d = +-1."""
        cache = self.__dict__.setdefault("_fl_cache", {})
        if "qr" not in cache:
            a, tau = torch.geqrf(self.u)
            d = torch.ones(self._numel(), dtype=self.dtype, device=self.device)
            d[: self.rank] = a.diagonal()[: self.rank].sign()
            cache["qr"] = (a, tau, d)
        return cache["qr"]

    def _basis(self, scale: Tensor) -> LinearOperator:
        a, tau, d = self._householder()
        return HouseholderBasis(a, tau, d * scale)

    def _eigenvectors(self) -> LinearOperator:
        return self._basis(torch.ones_like(self._eigenvalues()))

    def _root_tensor(self) -> LinearOperator | Tensor:
        if not bool(self.damping != 0):
            return self.u * self.evals.clamp_min(0).sqrt()  # (P, k): R R^T = U diag(lambda) U^T
        return self._basis(self._eigenvalues().clamp_min(0).sqrt())

    def _root_inv_tensor(self) -> LinearOperator | Tensor:
        if not bool(self.damping != 0):
            return self.u * pinv_scale(self.evals, -0.5)
        return self._basis(pinv_scale(self._eigenvalues(), -0.5))


class HouseholderBasis(LinearOperator):
    r"""Q diag(w) with Q (P, P) orthogonal, stored as the Householder reflectors of ``geqrf``;
    applied by ``ormqr`` in O(P k) per column. ``transposed``: diag(w) Q^T."""

    def __init__(self, reflectors: Tensor, tau: Tensor, w: Tensor, *, transposed: bool = False):
        super().__init__(reflectors, tau, w, transposed=transposed)
        self.reflectors = reflectors
        self.tau = tau
        self.w = w
        self.transposed = transposed

    def _size(self) -> torch.Size:
        p = self.reflectors.shape[0]
        return torch.Size([p, p])

    def _transpose_nonbatch(self) -> LinearOperator:
        return HouseholderBasis(self.reflectors, self.tau, self.w, transposed=not self.transposed)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        if self.transposed:
            out = self.w[:, None] * torch.ormqr(
                self.reflectors, self.tau, cols, left=True, transpose=True
            )
        else:
            out = torch.ormqr(
                self.reflectors, self.tau, self.w[:, None] * cols, left=True, transpose=False
            )
        return from_columns(out, shape, vector)

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self.shape[-1], dtype=self.dtype, device=self.device))
