r"""Common base of the Fisher operators: a symmetric PSD ``LinearOperator`` of shape (P, P) plus an
exact scalar damping ``delta`` (the operator is F + delta I).

Subclasses hold their tensors as constructor arguments (so ``.to()``, ``.double()``, autograd and
pickling work), implement ``_matmul_undamped`` and override what their structure does exactly:
``_diagonal_undamped``, ``_trace_undamped``, ``_frobenius_sq_undamped`` and the eigen-based solve,
log-determinant and root. ``add_diagonal`` with a scalar returns the same structure with a larger
damping, so damped solves stay exact; a vector diagonal falls back to linear_operator's sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor


def as_columns(rhs: Tensor) -> tuple[Tensor, tuple[int, ...], bool]:
    """(..., P, M) or (P,) -> (P, M') with the batch folded into the columns; and how to undo it."""
    if rhs.ndim == 1:
        return rhs[:, None], (), True
    batch = tuple(rhs.shape[:-2])
    cols = rhs.movedim(-2, 0).reshape(rhs.shape[-2], -1)
    return cols, batch + (rhs.shape[-1],), False


def from_columns(out: Tensor, shape: tuple[int, ...], vector: bool) -> Tensor:
    if vector:
        return out[:, 0]
    p = out.shape[0]
    return out.reshape(p, *shape).movedim(0, -2)


#: the rule of F1 + F2 for two Fisher operators; registered by :mod:`fim_linops.operators.addition`
#: (which knows every structure; the operators package imports it), so that this base imports none
SumRule = Callable[["FisherOperator", "FisherOperator"], LinearOperator]
_SUM_RULE: SumRule | None = None


def register_sum(rule: SumRule) -> SumRule:
    """Make ``rule`` the sum of two Fisher operators (``F1 + F2``); a decorator."""
    global _SUM_RULE
    _SUM_RULE = rule
    return rule


def _sum_rule() -> SumRule:
    if _SUM_RULE is None:  # only while fim_linops.operators is half imported
        raise RuntimeError(
            "no rule for the sum of two Fisher operators is registered; import fim_linops (or "
            "fim_linops.operators) before adding operators"
        )
    return _SUM_RULE


class FisherOperator(LinearOperator):
    """Symmetric PSD operator F + delta I with structure-specific exact methods."""

    #: the structure's name, as passed to fl.fisher(structure=...)
    structure: str = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    # -- damping ---------------------------------------------------------------------------------
    @property
    def damping(self) -> Tensor:
        return self._kwargs_damping

    def _with_damping(self, damping: Tensor) -> FisherOperator:
        kwargs = dict(self._kwargs)
        kwargs["damping"] = damping
        return self.__class__(*self._args, **kwargs)

    @property
    def _kwargs_damping(self) -> Tensor:
        return self._kwargs["damping"]

    def add_diagonal(self, diag: Tensor | float) -> LinearOperator:
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        if diag.numel() == 1:
            return self._with_damping(self.damping + diag.reshape(()))
        return super().add_diagonal(diag)

    def __add__(self, other):
        """F1 + F2 of two Fisher operators in the tightest structure that holds the sum exactly
        (the registered rule, :func:`fim_linops.algebra.add`); anything else goes to
        linear_operator."""
        if isinstance(other, FisherOperator):
            return _sum_rule()(self, other)
        return super().__add__(other)

    def __radd__(self, other):
        if isinstance(other, FisherOperator):
            return _sum_rule()(other, self)
        return super().__radd__(other)

    def __mul__(self, other: float | Tensor | LinearOperator) -> LinearOperator:
        """c F (a structured operator through ``_scaled`` where the structure has one) or F * other
        elementwise, as linear_operator defines it. Typed here: linear_operator ships no types."""
        return super().__mul__(other)

    def _mul_constant(self, other: float | Tensor) -> LinearOperator:
        c = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if c.numel() == 1 and hasattr(self, "_scaled"):
            return self._scaled(c.reshape(()))
        return super()._mul_constant(other)

    # -- LinearOperator interface -----------------------------------------------------------------
    def check_vector(self, rhs: Tensor, what: str = "vector") -> None:
        """Raise a clear error for a right-hand side of the wrong length, dtype or device."""
        if not isinstance(rhs, Tensor):
            return
        p = self._numel()
        if rhs.ndim == 0 or (rhs.shape[0] != p if rhs.ndim == 1 else rhs.shape[-2] != p):
            raise ValueError(
                f"{what} of shape {tuple(rhs.shape)} for an operator of size {p} x {p}: the length "
                "must be the number of trainable parameters P (use fl.ParamLayout.flatten)"
            )
        if rhs.dtype != self.dtype:
            raise ValueError(
                f"{what} has dtype {rhs.dtype} but the operator is {self.dtype}; use "
                f"v.to({self.dtype}) or F.to({rhs.dtype})"
            )
        if rhs.device != self.device:
            raise ValueError(
                f"{what} is on {rhs.device} but the operator is on {self.device}; move one of them"
            )

    def matmul(self, other):
        self.check_vector(other)
        return super().matmul(other)

    def _size(self) -> torch.Size:
        p = self._numel()
        return torch.Size([p, p])

    def _numel(self) -> int:
        raise NotImplementedError

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        out = self._matmul_undamped(cols) + self.damping * cols
        return from_columns(out, shape, vector)

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:  # (P, M) -> (P, M)
        raise NotImplementedError

    def _diagonal(self) -> Tensor:
        return self._diagonal_undamped() + self.damping

    def _diagonal_undamped(self) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no exact diagonal; use fl.spectral.diagonal for an estimate"
        )

    # -- metrics ---------------------------------------------------------------------------------
    def _trace_undamped(self) -> Tensor:
        return self._diagonal_undamped().sum()

    def _frobenius_sq_undamped(self) -> Tensor:
        raise NotImplementedError

    def trace_exact(self) -> Tensor:
        """tr(F + delta I)."""
        return self._trace_undamped() + self.damping * self._numel()

    def frobenius_sq_exact(self) -> Tensor:
        """||F + delta I||_F^2 = ||F||_F^2 + 2 delta tr F + delta^2 P."""
        d = self.damping
        return self._frobenius_sq_undamped() + 2 * d * self._trace_undamped() + d**2 * self._numel()

    def describe(self) -> str:
        """Each layer (for operators that store per-layer blocks: name and parameter count) and
        the structure; :class:`~fim_linops.operators.mixed.Mixed` adds each layer's type and why
        a layer is not Kronecker-factored."""
        specs = getattr(self, "specs", ())
        head = f"{type(self).__name__}(P={self._numel()})"
        if not specs or not all(hasattr(s, "start") for s in specs):
            return head
        structure = getattr(self, "structure", "")
        rows = [(s.name or "<model>", str(s.stop - s.start)) for s in specs]
        w0 = max(len("layer"), *(len(r[0]) for r in rows))
        w1 = max(len("params"), *(len(r[1]) for r in rows))
        lines = [f"  {'layer'.ljust(w0)}  {'params'.rjust(w1)}  structure"]
        lines += [f"  {n.ljust(w0)}  {p.rjust(w1)}  {structure}" for n, p in rows]
        return "\n".join([head, *lines])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self._numel()})"


def sym_eigh(m: Tensor, upcast: bool = False) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a (batch of) symmetric PSD matrices: symmetrised first, eigenvalues
    clamped at zero (they are PSD by construction; negatives are round-off). ``upcast`` runs the
    decomposition in float64 for lower-precision inputs (used for small Kronecker factors)."""
    work = m.double() if upcast and m.dtype in (torch.float32, torch.float16, torch.bfloat16) else m
    evals, evecs = torch.linalg.eigh((work + work.transpose(-1, -2)) / 2)
    return evals.clamp_min(0).to(m.dtype), evecs.to(m.dtype)


def pinv_scale(lam: Tensor, power: float = -1.0) -> Tensor:
    """lam ** power, with eigenvalues at round-off level treated as zero for negative powers
    (pseudo-inverse semantics for an undamped singular Fisher)."""
    if power >= 0:
        return lam.clamp_min(0) ** power
    tol = (
        lam.amax() * lam.shape[-1] * torch.finfo(lam.dtype).eps
        if lam.numel()
        else lam.new_zeros(())
    )
    safe = torch.where(lam > tol, lam, torch.ones_like(lam))
    return torch.where(lam > tol, safe**power, torch.zeros_like(lam))


if TYPE_CHECKING:  # the mixin is only ever combined with a FisherOperator
    _MixinBase = FisherOperator
else:
    _MixinBase = object


class ExactSolveMixin(_MixinBase):
    """Solve, inverse quadratic forms and log-determinants for a structure that solves (P, M)
    column blocks exactly (``_solve_cols``) and has an exact ``logdet``."""

    def _solve_cols(self, rhs: Tensor) -> Tensor:  # (P, M) -> (P, M)
        raise NotImplementedError

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """(F + delta I)^-1 right (or left @ (F + delta I)^-1 right)."""
        self.check_vector(right_tensor, "right-hand side")
        res = self._solve(right_tensor)
        return res if left_tensor is None else left_tensor @ res

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int = 0) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        return from_columns(self._solve_cols(cols), shape, vector)

    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor, Tensor]:
        inv_quad = torch.zeros((), dtype=self.dtype, device=self.device)
        if inv_quad_rhs is not None:
            solved = self.solve(inv_quad_rhs)
            if inv_quad_rhs.ndim == 1:
                inv_quad = (inv_quad_rhs * solved).sum(-1)
            else:
                inv_quad = (inv_quad_rhs * solved).sum(-2)
                if reduce_inv_quad:
                    inv_quad = inv_quad.sum(-1)
        ld = self.logdet() if logdet else torch.zeros((), dtype=self.dtype, device=self.device)
        return inv_quad, ld

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, False, reduce_inv_quad)[0]


class EigenOperator(ExactSolveMixin, FisherOperator):
    """A Fisher operator whose eigendecomposition is structural (dense, per block, Kronecker).

    Subclasses implement ``_eig_apply(rhs, fn)`` = Q diag(fn(lambda + delta)) Q^T rhs for rhs (P, M),
    ``_eigenvalues()`` (P,) of the damped operator, and ``_eigenvectors()`` (an operator or tensor Q).
    Solve, log-determinant, inverse quadratic forms, roots, powers and ``eigh`` follow exactly.
    """

    def _eig_apply(self, rhs: Tensor, fn) -> Tensor:
        raise NotImplementedError

    def _eigenvalues(self) -> Tensor:
        raise NotImplementedError

    def _eigenvectors(self) -> LinearOperator | Tensor:
        raise NotImplementedError

    def _root_tensor(self) -> LinearOperator | Tensor:
        raise NotImplementedError

    def apply_power(self, rhs: Tensor, alpha: float) -> Tensor:
        """(F + delta I)^alpha rhs, exactly (pseudo-inverse for singular F and alpha < 0)."""
        cols, shape, vector = as_columns(rhs)
        out = self._eig_apply(cols, lambda lam: pinv_scale(lam, alpha))
        return from_columns(out, shape, vector)

    def _solve_cols(self, rhs: Tensor) -> Tensor:
        return self._eig_apply(rhs, lambda lam: pinv_scale(lam, -1.0))

    def logdet(self) -> Tensor:
        return torch.log(self._eigenvalues()).sum()

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        """R with R R^T = F + delta I, exact (from the structural eigendecomposition)."""
        from linear_operator.operators import RootLinearOperator

        return RootLinearOperator(self._root_tensor())

    def root_inv_decomposition(self, initial_vectors=None, test_vectors=None, method=None):
        from linear_operator.operators import RootLinearOperator

        return RootLinearOperator(self._root_inv_tensor())

    def _root_inv_tensor(self) -> LinearOperator | Tensor:
        raise NotImplementedError

    def _symeig(self, eigenvectors: bool = False, return_evals_as_lazy: bool | None = False):
        evecs = self._eigenvectors() if eigenvectors else None
        if isinstance(evecs, Tensor):
            from linear_operator.operators import DenseLinearOperator

            evecs = DenseLinearOperator(evecs)
        return self._eigenvalues(), evecs

    def eigh(self) -> tuple[Tensor, LinearOperator]:
        """All eigenvalues (P,) of F + delta I (not sorted, not clamped beyond round-off) and the
        eigenvectors as an operator (never densified here)."""
        return self._symeig(eigenvectors=True)

    def eigvalsh(self) -> Tensor:
        return self._eigenvalues()
