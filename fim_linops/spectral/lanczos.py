r"""Lanczos tridiagonalisation of a symmetric operator, batched over start vectors, and the
extreme eigenpairs from it.

For symmetric A (P, P) and unit start vectors q_1 (one per column of a block), Lanczos builds
orthonormal Q_m = [q_1 ... q_m] and the tridiagonal T_m = Q_m^T A Q_m (diagonal alpha, off-diagonal
beta) by the three-term recurrence

    beta_i q_{i+1} = A q_i - alpha_i q_i - beta_{i-1} q_{i-1},   alpha_i = q_i^T A q_i.

With ``reorth="full"`` each new vector is re-orthogonalised twice (classical Gram-Schmidt, "twice
is enough") against all previous ones, which keeps Q_m orthonormal to working precision: no ghost
copies of converged eigenvalues. On breakdown (beta_i ~ 0: the Krylov space is invariant) the
recurrence continues from a fresh random vector orthogonal to Q_m with beta_i = 0, so T_m becomes
block diagonal and repeated eigenvalues are found, as in ARPACK.

Unlike ``linear_operator``'s Lanczos-based routines, nothing here clamps eigenvalues: an indefinite
operator keeps its negative eigenvalues.
"""

from __future__ import annotations

import warnings
from typing import TypeAlias

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

__all__ = ["LanczosRecurrence", "lanczos"]

Operator: TypeAlias = LinearOperator | Tensor


class LanczosRecurrence:
    r"""n independent Lanczos recurrences run together: one ``op @ V`` per step, V (P, n).

    Shapes: P the operator size, n the number of start vectors (probes), m the steps taken.
    After ``extend``: ``alpha`` (n, m), ``beta`` (n, m) (beta[:, i] couples steps i and i + 1),
    ``basis`` (m, P, n) when ``reorth="full"`` (the Lanczos vectors, for reorthogonalisation and
    Ritz vectors). ``tridiagonal()`` returns T (n, m, m). Cost per step: one product with a (P, n)
    block, plus O(m P n) for full reorthogonalisation, and one host synchronisation (the breakdown
    test). Memory: O(m P n) with the basis, O(P n) without.
    """

    def __init__(
        self,
        op: Operator,
        start: Tensor,
        reorth: str = "full",
        generator: torch.Generator | None = None,
    ) -> None:
        if reorth not in ("full", "none"):
            raise ValueError(f"reorth must be 'full' or 'none', got {reorth!r}")
        self.op, self.reorth, self.generator = op, reorth, generator
        q = start / torch.linalg.vector_norm(start, dim=0)
        self.size, self.n = q.shape
        self.q, self.q_prev = q, torch.zeros_like(q)
        self.beta_prev = torch.zeros(self.n, dtype=q.dtype, device=q.device)
        self.anorm = torch.zeros_like(self.beta_prev)  # running estimate of ||A|| per column
        self.alphas: list[Tensor] = []
        self.betas: list[Tensor] = []
        self._basis = torch.empty(0, *q.shape, dtype=q.dtype, device=q.device)
        self.steps = 0

    @property
    def basis(self) -> Tensor:
        """Lanczos vectors Q (m, P, n) (``reorth="full"`` only)."""
        return self._basis[: self.steps]

    @property
    def alpha(self) -> Tensor:
        return torch.stack(self.alphas, dim=1)

    @property
    def beta(self) -> Tensor:
        return torch.stack(self.betas, dim=1)

    def tridiagonal(self) -> Tensor:
        """T (n, m, m) with alpha on the diagonal and beta[:, :m-1] off it."""
        alpha, beta = self.alpha, self.beta[:, :-1]
        return torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)

    def _orthogonalise(self, w: Tensor, passes: int = 2) -> Tensor:
        # s: step, p: row of the operator, n: start vector
        Q = self._basis[: self.steps + 1]
        for _ in range(passes):
            w = w - torch.einsum("spn,sn->pn", Q, torch.einsum("spn,pn->sn", Q, w))
        return w

    def _store(self, q: Tensor) -> None:
        if self.steps >= self._basis.shape[0]:
            grow = max(16, self._basis.shape[0])
            self._basis = torch.cat([self._basis, self._basis.new_empty(grow, *q.shape)])
        self._basis[self.steps] = q

    def extend(self, n_steps: int) -> LanczosRecurrence:
        """Run ``n_steps`` more steps (never past P). Returns self."""
        n_steps = min(n_steps, self.size - self.steps)
        eps = torch.finfo(self.q.dtype).eps
        with torch.no_grad():
            for _ in range(n_steps):
                if self.reorth == "full":
                    self._store(self.q)
                w = self.op @ self.q  # (P, n)
                alpha = (self.q * w).sum(0)
                w = w - alpha * self.q - self.beta_prev * self.q_prev
                if self.reorth == "full":
                    w = self._orthogonalise(w)
                beta = torch.linalg.vector_norm(w, dim=0)
                self.anorm = torch.maximum(self.anorm, alpha.abs() + beta + self.beta_prev)
                broken = beta <= eps * self.anorm
                if self.steps + 1 < self.size and bool(broken.any()):
                    fresh = torch.randn(
                        w.shape, generator=self.generator, dtype=w.dtype, device=w.device
                    )
                    fresh = fresh - self.q * (self.q * fresh).sum(0)
                    if self.reorth == "full":
                        fresh = self._orthogonalise(fresh)
                    fresh = fresh / torch.linalg.vector_norm(fresh, dim=0)
                    beta = torch.where(broken, torch.zeros_like(beta), beta)
                    q_next = torch.where(broken, fresh, w / torch.where(broken, 1.0, beta))
                else:
                    q_next = w / beta
                self.alphas.append(alpha)
                self.betas.append(beta)
                self.q_prev, self.q, self.beta_prev = self.q, q_next, beta
                self.steps += 1
        return self


def _select(k: int, m: int, which: str, device: torch.device) -> Tensor:
    """Indices into the ascending Ritz values of the k wanted ones (eigsh's convention)."""
    if which == "LA":
        return torch.arange(m - k, m, device=device)
    if which == "SA":
        return torch.arange(k, device=device)
    high = k - k // 2  # eigsh: one more from the high end when k is odd
    return torch.cat(
        [torch.arange(k // 2, device=device), torch.arange(m - high, m, device=device)]
    )


def lanczos(
    op: Operator,
    k: int,
    which: str = "LA",
    n_steps: int | None = None,
    reorth: str = "full",
    seed: int = 0,
    tol: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""k extreme eigenpairs of a symmetric operator A (P, P) by Lanczos, like
    ``scipy.sparse.linalg.eigsh(A, k, which=which)``.

    Args:
        op: symmetric ``LinearOperator`` or Tensor (P, P); any dtype and device.
        k: number of eigenpairs, 1 <= k <= P.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"BE"`` both ends
            (k // 2 from the bottom, the rest from the top).
        n_steps: Lanczos steps m (restart-free Krylov space of dimension m). ``None``: adaptive,
            starting at min(P, max(2k + 10, 20)) and growing 5 steps at a time until every
            wanted Ritz pair has residual ||A y - theta y|| = |beta_m s_{m,i}| <= tol ||T_m||, up
            to min(P, 6 max(2k + 20, 50)) steps (with a warning if that is not enough).
        reorth: ``"full"`` (default) or ``"none"`` (only sensible for n_steps << P).
        seed: seed of the random start vector (a ``torch.Generator`` on ``op``'s device).
        tol: residual tolerance of the adaptive mode; default eps^(2/3) of the dtype.

    Returns:
        eigenvalues (k,) in ascending order and eigenvectors (P, k), orthonormal, column i
        belonging to eigenvalue i. Negative eigenvalues are kept.
    """
    if op.dim() != 2 or op.shape[0] != op.shape[1]:
        raise ValueError(f"lanczos: expected a square (P, P) operator, got shape {tuple(op.shape)}")
    P = op.shape[-1]
    if not 1 <= k <= P:
        raise ValueError(f"lanczos: k must be in [1, P = {P}], got {k}")
    if which not in ("LA", "SA", "BE"):
        raise ValueError(f"lanczos: which must be 'LA', 'SA' or 'BE', got {which!r}")
    gen = torch.Generator(device=op.device).manual_seed(seed)
    start = torch.randn(P, 1, generator=gen, dtype=op.dtype, device=op.device)
    rec = LanczosRecurrence(op, start, reorth=reorth, generator=gen)
    if n_steps is not None:
        if n_steps < k:
            raise ValueError(f"lanczos: n_steps = {n_steps} < k = {k}")
        rec.extend(n_steps)
        theta, S = torch.linalg.eigh(rec.tridiagonal()[0])
    else:
        m0 = min(P, max(2 * k + 10, 20))
        m_max, chunk = min(P, 6 * max(2 * k + 20, 50)), 5
        tol = torch.finfo(op.dtype).eps ** (2 / 3) if tol is None else tol
        rec.extend(m0)
        while True:
            theta, S = torch.linalg.eigh(rec.tridiagonal()[0])
            idx = _select(k, rec.steps, which, theta.device)
            resid = (rec.beta[0, -1] * S[-1, idx]).abs()
            scale = theta.abs().amax()
            if rec.steps >= m_max or bool((resid <= tol * scale).all()):
                break
            rec.extend(chunk)
        if rec.steps < P and not bool((resid <= tol * scale).all()):
            worst = float((resid / scale).amax())
            warnings.warn(
                f"lanczos: after {rec.steps} steps the largest relative Ritz residual is "
                f"{worst:.2e} > tol = {tol:.1e}; pass a larger n_steps",
                stacklevel=2,
            )
    idx = _select(k, rec.steps, which, theta.device)
    vals = theta[idx]
    if rec.reorth == "full":
        vecs = rec.basis[:, :, 0].mT @ S[:, idx]
    else:  # second pass: replay the same recurrence and accumulate y = sum_i q_i S[i, idx]
        gen = torch.Generator(device=op.device).manual_seed(seed)
        start = torch.randn(P, 1, generator=gen, dtype=op.dtype, device=op.device)
        replay = LanczosRecurrence(op, start, reorth="none", generator=gen)
        vecs = torch.zeros(P, k, dtype=op.dtype, device=op.device)
        for i in range(rec.steps):
            vecs = vecs + replay.q * S[i, idx]
            if i + 1 < rec.steps:
                replay.extend(1)
    return vals, vecs
