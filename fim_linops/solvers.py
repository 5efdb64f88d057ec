r"""Solves with a (damped) Fisher: conjugate gradients, natural gradients, and the EWC penalty.

``op`` is any symmetric positive (semi-)definite ``LinearOperator`` or Tensor (P, P) — a Fisher,
a GGN, a Laplace posterior precision — on any device and dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeAlias

import torch
from linear_operator import to_linear_operator
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

__all__ = ["CGInfo", "cg", "ewc_penalty", "natural_gradient"]

Operator: TypeAlias = LinearOperator | Tensor
Preconditioner: TypeAlias = LinearOperator | Tensor | Callable[[Tensor], Tensor]


@dataclass
class CGInfo:
    """Outcome of :func:`cg`.

    Attributes:
        iterations: CG iterations, one operator product with the (P, M) block each (the true
            residual checks and restarts cost one more product each, not counted here).
        residuals: (iterations + 1, M) relative residual norms ||b_j - A x_j|| / ||b_j|| per
            iteration and right-hand side (M = 1 for a vector b); the last row is the true
            residual of the returned solution.
        converged: (M,) whether each column reached ``tol``.
    """

    iterations: int
    residuals: Tensor
    converged: Tensor


def _as_preconditioner(preconditioner: Preconditioner | None) -> Callable[[Tensor], Tensor] | None:
    """r -> M^{-1} r: a LinearOperator or Tensor M is solved with (Cholesky once for a Tensor),
    a callable is applied as given."""
    if (
        preconditioner is None
        or callable(preconditioner)
        and not isinstance(preconditioner, LinearOperator | Tensor)
    ):
        return preconditioner
    if isinstance(preconditioner, Tensor):
        chol = torch.linalg.cholesky(preconditioner)
        return lambda r: torch.cholesky_solve(r, chol)
    return preconditioner.solve


def cg(
    op: Operator | Callable[[Tensor], Tensor],
    b: Tensor,
    tol: float = 1e-6,
    max_iter: int | None = None,
    preconditioner: Preconditioner | None = None,
    x0: Tensor | None = None,
) -> tuple[Tensor, CGInfo]:
    r"""Preconditioned conjugate gradients for A x = b, A symmetric positive definite (P, P).

    Batched over the columns of b (P,) or (P, M): one product A D per iteration with D (P, M);
    each column keeps its own step sizes and stops (is frozen) once ||b_j - A x_j|| <= tol ||b_j||.
    When the recurrence says every column has converged, the true residual b - A x is computed and
    any column above ``tol`` restarts from it, so the tolerance holds for the returned x.

    Iteration (per column, M^{-1} the preconditioner):
        z = M^{-1} r, d = z;  alpha = r^T z / d^T A d,  x += alpha d,  r -= alpha A d,
        z' = M^{-1} r,  d = z' + (r'^T z' / r^T z) d.

    Args:
        op: ``LinearOperator``, Tensor, or callable v -> A v on (P, M) blocks.
        b: right-hand side(s), (P,) or (P, M).
        tol: relative residual tolerance per column.
        max_iter: maximum number of iterations (default 10 P).
        preconditioner: M approximating A: a LinearOperator or Tensor (M.solve / Cholesky applied to
            the residual) or a callable r -> M^{-1} r.
        x0: initial guess, shape of b (default zeros).

    Returns:
        x of the shape of b, and a :class:`CGInfo`.
    """
    matmul = op if callable(op) and not isinstance(op, LinearOperator | Tensor) else op.__matmul__
    apply_m = _as_preconditioner(preconditioner)
    vector = b.ndim == 1
    B = b[:, None] if vector else b
    P = B.shape[0]
    max_iter = 10 * P if max_iter is None else max_iter
    x = torch.zeros_like(B) if x0 is None else (x0[:, None] if vector else x0).clone().to(B)
    bnorm = torch.linalg.vector_norm(B, dim=0)
    scale = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    iterations = 0

    def restart() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r = B - matmul(x) if (x0 is not None or iterations > 0) else B.clone()
        z = apply_m(r) if apply_m else r
        return r, z, z.clone(), (r * z).sum(0)

    r, z, d, rz = restart()
    rel = torch.linalg.vector_norm(r, dim=0) / scale
    history = [rel]
    active = rel > tol
    while iterations < max_iter:
        if not bool(active.any()):
            true_rel = torch.linalg.vector_norm(B - matmul(x), dim=0) / scale
            history[-1] = true_rel
            active = true_rel > tol
            if not bool(active.any()):
                break
            r, z, d, rz = restart()
        ad = matmul(d)
        iterations += 1
        dad = (d * ad).sum(0)
        ok = active & (dad > 0)
        alpha = torch.where(
            ok, rz / torch.where(ok, dad, torch.ones_like(dad)), torch.zeros_like(dad)
        )
        x = x + alpha * d
        r = r - alpha * ad
        z = apply_m(r) if apply_m else r
        rz_new = (r * z).sum(0)
        ok_rz = ok & (rz != 0)
        beta = torch.where(ok_rz, rz_new / torch.where(ok_rz, rz, torch.ones_like(rz)), 0.0)
        d = torch.where(ok, z + beta * d, d)
        rz = torch.where(ok, rz_new, rz)
        rel = torch.where(ok, torch.linalg.vector_norm(r, dim=0) / scale, history[-1])
        history.append(rel)
        active = ok & (rel > tol)
    else:
        history[-1] = torch.linalg.vector_norm(B - matmul(x), dim=0) / scale
    residuals = torch.stack(history)
    info = CGInfo(iterations=iterations, residuals=residuals, converged=residuals[-1] <= tol)
    return (x[:, 0] if vector else x), info


def natural_gradient(
    F: Operator,
    grad: Tensor,
    damping: float | Tensor = 0.0,
    method: str = "exact",
    preconditioner: Preconditioner | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> Tensor:
    r"""Natural gradient (F + damping I)^{-1} g for g (P,) or (P, M).

    - ``method="exact"``: ``F.add_diagonal(damping).solve(g)`` (``F.solve(g)`` without damping);
      the Fisher operators of this package solve exactly through their structure (Kronecker
      eigenbases, Woodbury, per-block Cholesky).
    - ``method="cg"``: :func:`cg` on v -> F v + damping v to relative residual ``tol``, optionally
      preconditioned (e.g. by a KFAC approximation of the same Fisher). Warns if not converged.
    """
    if isinstance(damping, float | int) and damping < 0:
        raise ValueError(f"natural_gradient: damping must be >= 0, got {damping}")
    if method == "exact":
        if preconditioner is not None:
            raise ValueError("natural_gradient: a preconditioner only applies to method='cg'")
        op = to_linear_operator(F) if isinstance(F, Tensor) else F
        if isinstance(damping, Tensor) or damping > 0:
            op = op.add_diagonal(torch.as_tensor(damping, dtype=op.dtype, device=op.device))
        return op.solve(grad)
    if method == "cg":
        damp = torch.as_tensor(damping, dtype=F.dtype, device=F.device)

        def matmul(v: Tensor) -> Tensor:
            return F @ v + damp * v

        x, info = cg(matmul, grad, tol=tol, max_iter=max_iter, preconditioner=preconditioner)
        if not bool(info.converged.all()):
            warnings.warn(
                f"natural_gradient: CG stopped after {info.iterations} products at relative "
                f"residual {float(info.residuals[-1].max()):.2e} > tol = {tol:.1e}; "
                "increase max_iter or damping, or pass a preconditioner",
                stacklevel=2,
            )
        return x
    raise ValueError(f"natural_gradient: method must be 'exact' or 'cg', got {method!r}")


def ewc_penalty(F: Operator, params: Iterable[Tensor] | nn.Module, anchor: Tensor) -> Tensor:
    r"""Elastic weight consolidation penalty 1/2 (theta - theta*)^T F (theta - theta*) (0-d).

    theta = ``parameters_to_vector(params)`` (the public order: parameters in the order given,
    each flattened row-major; an ``nn.Module`` means its ``parameters()``), theta* = ``anchor``
    (P,). Differentiable with respect to ``params``: the gradient is F (theta - theta*); F is a
    constant. Multiply by lambda / N as your EWC variant prescribes.
    """
    if isinstance(params, nn.Module):
        params = params.parameters()
    theta = nn.utils.parameters_to_vector(list(params))
    if anchor.shape != theta.shape:
        raise ValueError(
            f"ewc_penalty: anchor has shape {tuple(anchor.shape)}, the parameters flatten to "
            f"{tuple(theta.shape)}"
        )
    delta = (theta - anchor.to(theta.device, theta.dtype)).to(F.dtype)
    return 0.5 * (delta * (F @ delta)).sum()
