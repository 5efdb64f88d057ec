r"""The damped Fisher (F + damping I) and its solve, for every structure.

Operators with an exact solve (dense, block_diag, diag, kfac, ekfac, lowrank, quasi_diag,
kron_sum, mixes of them) take the damping exactly through :meth:`FisherOperator.add_diagonal`
(for KFAC/EKFAC in the joint eigenbasis: (G kron A + d I)^-1 = (Q_G kron Q_A)
diag(1 / (l_G l_A^T + d)) (Q_G kron Q_A)^T, never (G + ..)^-1 kron (A + ..)^-1) and solve with
their own machinery. ``implicit`` solves by conjugate gradients (:func:`fim_linops.solvers.cg`)
to a relative residual of 1e-10 in float64, 1e-6 in float32 (linear_operator's default CG stops at
a residual of 1: never used). Any other LinearOperator or dense Tensor works the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import ExactSolveMixin, FisherOperator
from fim_linops.solvers import cg

Solve = Callable[[Tensor], Tensor]  # (P, M) -> (P, M)


def check_damping(damping: Any) -> float:
    if isinstance(damping, bool) or not isinstance(damping, int | float):
        raise TypeError(f"damping must be a non-negative number, got {damping!r}")
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    return float(damping)


def damped_solve(op: LinearOperator | Tensor, damping: float, cg_tol: float | None = None) -> Solve:
    """B (P, M) -> (op + damping I)^-1 B, exactly where the structure allows, else by CG."""
    if isinstance(op, FisherOperator):
        damped = op.add_diagonal(damping)
        if isinstance(damped, ExactSolveMixin) and cg_tol is None:
            return damped.solve
    elif isinstance(op, Tensor):
        eye = torch.eye(op.shape[0], dtype=op.dtype, device=op.device)
        chol = torch.linalg.cholesky(op + damping * eye)
        return lambda b: torch.cholesky_solve(b, chol)
    elif isinstance(op, LinearOperator):
        damped = op.add_diagonal(torch.full((), damping, dtype=op.dtype, device=op.device))
    else:
        raise TypeError(
            f"structure must be a structure name, a per-layer mix or a LinearOperator, got "
            f"{type(op).__name__}"
        )
    tol = cg_tol if cg_tol is not None else (1e-10 if op.dtype == torch.float64 else 1e-6)

    def solve(b: Tensor) -> Tensor:
        x, info = cg(damped._matmul if isinstance(damped, FisherOperator) else damped, b, tol=tol)
        if not bool(info.converged.all()):
            warnings.warn(
                f"influence: CG on (F + damping I) stopped at a relative residual of "
                f"{float(info.residuals[-1].max()):.2e} > {tol:.1e}; increase damping",
                stacklevel=3,
            )
        return x

    return solve
