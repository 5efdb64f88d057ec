r"""Sums and powers of Fisher operators that have no common closed form.

* :class:`Sum`: F_1 + F_2 (+ delta I) of any two Fisher operators; products, diagonal and trace
  add up; solve by conjugate gradients (Jacobi-preconditioned when both diagonals are exact) with a
  relative tolerance that really applies (1e-10 in float64, 1e-5 in float32).
* :class:`Power`: c (F + delta_0 I)^alpha (+ delta I) of an operator with a structural
  eigendecomposition, F = Q diag(lambda) Q^T: Q diag(c lambda^alpha + delta) Q^T, so products,
  solve, log-determinant, roots, eigh and further powers stay exact. Negative powers of singular
  operators are pseudo-inverse powers.
"""

from __future__ import annotations

import warnings

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import (
    EigenOperator,
    FisherOperator,
    as_columns,
    from_columns,
    pinv_scale,
)
from fim_linops.solvers import cg


class Sum(FisherOperator):
    """F_1 + F_2 + delta I for two Fisher operators of any structure."""

    structure = "sum"

    def __init__(
        self, first: FisherOperator, second: FisherOperator, *, damping: Tensor | None = None
    ):
        if first.shape != second.shape:
            raise ValueError(
                f"cannot add Fisher operators of shapes {tuple(first.shape)} and {tuple(second.shape)}"
            )
        if damping is None:
            damping = torch.zeros((), dtype=first.dtype, device=first.device)
        super().__init__(first, second, damping=damping)
        self.first = first
        self.second = second

    def _numel(self) -> int:
        return self.first.shape[-1]

    def _scaled(self, c: Tensor) -> Sum:
        return Sum(self.first * c, self.second * c, damping=self.damping * c)

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        return self.first._matmul(rhs) + self.second._matmul(rhs)

    def _diagonal_undamped(self) -> Tensor:
        return self.first.diagonal() + self.second.diagonal()

    def _trace_undamped(self) -> Tensor:
        return self.first.trace_exact() + self.second.trace_exact()

    def _frobenius_sq_undamped(self) -> Tensor:
        raise NotImplementedError(
            "||F_1 + F_2||_F needs tr(F_1 F_2), which has no closed form across structures; use "
            "fl.spectral.trace on (F_1 + F_2)^2 for an estimate"
        )

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self._numel(), dtype=self.dtype, device=self.device))

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """(F_1 + F_2 + delta I)^-1 right by (Jacobi-)preconditioned conjugate gradients."""
        self.check_vector(right_tensor, "right-hand side")
        cols, shape, vector = as_columns(right_tensor)
        res = from_columns(self._solve_cols(cols), shape, vector)
        return res if left_tensor is None else left_tensor @ res

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int = 0) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        return from_columns(self._solve_cols(cols), shape, vector)

    def _solve_cols(self, rhs: Tensor) -> Tensor:
        tol = 1e-10 if self.dtype == torch.float64 else 1e-5
        try:
            inv_diag = pinv_scale(self._diagonal(), -1.0)[:, None]
        except NotImplementedError:
            inv_diag = None
        pre = None if inv_diag is None else (lambda r: inv_diag * r)
        x, _ = cg(self._matmul, rhs, tol=tol, preconditioner=pre)
        resid = torch.linalg.vector_norm(self._matmul(x) - rhs, dim=0)
        if bool((resid > 10 * tol * torch.linalg.vector_norm(rhs, dim=0)).any()):
            warnings.warn(
                "Sum.solve: conjugate gradients did not reach the tolerance (is F_1 + F_2 + damping "
                "positive definite? a truncated kron_sum or quasi_diag need not be); add damping",
                stacklevel=3,
            )
        return x


class Power(EigenOperator):
    r"""scale * base^alpha + delta I for a ``base`` with a structural eigendecomposition (its own
    damping included in base)."""

    structure = "power"

    def __init__(
        self,
        base: EigenOperator,
        *,
        alpha: float,
        scale: Tensor | None = None,
        damping: Tensor | None = None,
    ):
        if damping is None:
            damping = torch.zeros((), dtype=base.dtype, device=base.device)
        if scale is None:
            scale = torch.ones((), dtype=base.dtype, device=base.device)
        super().__init__(base, alpha=float(alpha), scale=scale, damping=damping)
        self.base = base
        self.alpha = float(alpha)
        self.scale = scale

    def _numel(self) -> int:
        return self.base._numel()

    def _scaled(self, c: Tensor) -> Power:
        return Power(self.base, alpha=self.alpha, scale=self.scale * c, damping=self.damping * c)

    def _values(self, lam: Tensor) -> Tensor:
        return self.scale * pinv_scale(lam, self.alpha)

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        return self.base._eig_apply(rhs, self._values)

    def _eig_apply(self, rhs: Tensor, fn) -> Tensor:
        return self.base._eig_apply(rhs, lambda lam: fn(self._values(lam) + self.damping))

    def _eigenvalues(self) -> Tensor:
        return self._values(self.base._eigenvalues()) + self.damping

    def _eigenvectors(self) -> LinearOperator | Tensor:
        return self.base._eigenvectors()

    def _diagonal_undamped(self) -> Tensor:
        raise NotImplementedError(
            "a matrix power has no closed-form diagonal here; use fl.spectral.diagonal"
        )

    def _trace_undamped(self) -> Tensor:
        return self._values(self.base._eigenvalues()).sum()

    def _frobenius_sq_undamped(self) -> Tensor:
        return (self._values(self.base._eigenvalues()) ** 2).sum()

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self._numel(), dtype=self.dtype, device=self.device))

    def _root_tensor(self) -> LinearOperator:
        return SymmetricPower(self, alpha=0.5)

    def _root_inv_tensor(self) -> LinearOperator:
        return SymmetricPower(self, alpha=-0.5)


class SymmetricPower(LinearOperator):
    """op^alpha as an operator (symmetric: its own transpose), applied through op.apply_power."""

    def __init__(self, op: EigenOperator, *, alpha: float):
        super().__init__(op, alpha=float(alpha))
        self.op = op
        self.alpha = float(alpha)

    def _size(self) -> torch.Size:
        return self.op.shape

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.op.apply_power(rhs, self.alpha)

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self.shape[-1], dtype=self.dtype, device=self.device))
