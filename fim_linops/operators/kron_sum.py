r"""Kronecker-sum Fisher: F ~ blockdiag_l sum_{s<r_l} L_{l,s} kron R_{l,s} over the row-major matrix
view M_l of each layer (see :mod:`fim_linops.operators.kron`), the nearest such sum to the exact
layer block in Frobenius norm (Van Loan & Pitsianis 1993).

Stored: per block L (r, groups, rows, rows) and R (r, groups, cols, cols); the terms are symmetric
pairs or antisymmetric pairs (see the builder). Products vec(sum_s L_s X R_s^T) cost O(r (rows^2 cols + rows cols^2)) per block and column.

Exact linear algebra where a congruence F_b = X diag(mu) X^T with X = A kron B is available:

* r = 1 (any damping): A, B the eigenvectors of L, R, mu = lambda_L lambda_R + delta (orthogonal:
  ``eigh`` too);
* r = 2, no damping, L_1 and R_1 positive definite (simultaneous diagonalisation):
  A = L_1^{1/2} U, B = R_1^{1/2} V with L_1^{-1/2} L_2 L_1^{-1/2} = U diag(alpha) U^T,
  R_1^{-1/2} R_2 R_1^{-1/2} = V diag(beta) V^T, mu = 1 + alpha_i beta_j.

Then solve = X^{-T} diag(1/mu) X^{-1}, logdet = sum log mu + 2 (cols log|det A| + rows log|det B|),
root = X diag(mu^{1/2}). Other blocks are solved by conjugate gradients preconditioned with the exact
inverse of their first term plus damping, to a relative tolerance that really applies; their
log-determinant and root are not available in closed form (a clear error says so).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import (
    ExactSolveMixin,
    FisherOperator,
    pinv_scale,
    sym_eigh,
)
from fim_linops.operators.kron import KronBasis
from fim_linops.operators.kron_blocks import KronBlocks, trace_of_pairs
from fim_linops.solvers import cg


def _kron_apply(left: Tensor, right: Tensor, x: Tensor) -> Tensor:
    """sum_s L_s X R_s^T for x (m, groups, rows, cols), L (r, g, rows, rows), R (r, g, cols, cols)."""
    return (left[:, None] @ x[None] @ right[:, None].transpose(-1, -2)).sum(0)


def _symmetric(m: Tensor) -> bool:
    return bool(
        (m - m.transpose(-1, -2)).abs().amax() <= 1e3 * torch.finfo(m.dtype).eps * m.abs().amax()
    )


class KronSum(KronBlocks, ExactSolveMixin, FisherOperator):
    r"""Block-diagonal sum of Kronecker products per layer.

    Args:
        tensors: per spec, ``left`` (r, groups, rows, rows) and ``right`` (r, groups, cols, cols).
        specs: the Kronecker block layout.
        damping: scalar delta.
    """

    structure = "kron_sum"
    needs = "(left, right) stacks"

    @property
    def factors(self) -> tuple[Tensor, ...]:
        return self.tensors

    def pairs(self) -> Iterator[Any]:
        """(spec, left (r, g, rows, rows), right (r, g, cols, cols)) per block."""
        return self.blocks()

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(left.shape[0] for _, left, _ in self.pairs())

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        outs = []
        for spec, left, right in self.pairs():
            x = spec.to_mat(rhs[spec.start : spec.stop])
            outs.append(spec.from_mat(_kron_apply(left, right, x)))
        return torch.cat(outs, dim=0)

    def _diagonal_undamped(self) -> Tensor:
        outs = []
        for spec, left, right in self.pairs():
            dl, dr = left.diagonal(dim1=-2, dim2=-1), right.diagonal(dim1=-2, dim2=-1)
            d = (dl[..., :, None] * dr[..., None, :]).sum(0)  # (g, rows, cols)
            outs.append(spec.from_mat(d[None])[:, 0])
        return torch.cat(outs)

    def _trace_undamped(self) -> Tensor:
        return trace_of_pairs(self.pairs())

    def _frobenius_sq_undamped(self) -> Tensor:
        # ||sum_s L_s kron R_s||^2 = sum_{s,t} <L_s, L_t> <R_s, R_t>  (s, t: terms, g: group)
        return sum(
            (
                (
                    torch.einsum("sgab,tgab->stg", left, left)
                    * torch.einsum("sgab,tgab->stg", right, right)
                ).sum()
                for _, left, right in self.pairs()
            ),
            self.damping.new_zeros(()),
        )

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self._numel(), dtype=self.dtype, device=self.device))

    # -- congruence forms ------------------------------------------------------------------------
    def _congruence(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """(A, B, mu) with block = (A kron B) diag(mu) (A kron B)^T + delta I, or None."""
        r = left.shape[0]
        if r == 1:
            ll, ql = sym_eigh(left[0])
            lr, qr = sym_eigh(right[0])
            return ql, qr, ll[:, :, None] * lr[:, None, :] + self.damping
        if r == 2 and not bool(self.damping != 0) and _symmetric(left[1]) and _symmetric(right[1]):
            # (-L1) kron (-R1) = L1 kron R1: make the first term's factors positive
            sign = torch.where(left[0].diagonal(dim1=-2, dim2=-1).sum(-1) < 0, -1.0, 1.0).to(
                left.dtype
            )[:, None, None]
            l1, r1 = left[0] * sign, right[0] * sign
            ll1, ql1 = torch.linalg.eigh((l1 + l1.transpose(-1, -2)) / 2)
            lr1, qr1 = torch.linalg.eigh((r1 + r1.transpose(-1, -2)) / 2)
            tiny = torch.finfo(left.dtype).eps * 1e3
            if bool((ll1 <= tiny * ll1.amax(-1, keepdim=True)).any()) or bool(
                (lr1 <= tiny * lr1.amax(-1, keepdim=True)).any()
            ):
                return None
            sl = ql1 * ll1[:, None, :].rsqrt()  # sl^T L1 sl = I, so C = sl^{-T} has C C^T = L1
            sr = qr1 * lr1[:, None, :].rsqrt()
            alpha, u = torch.linalg.eigh(sl.transpose(-1, -2) @ left[1] @ sl)
            beta, v = torch.linalg.eigh(sr.transpose(-1, -2) @ right[1] @ sr)
            a = torch.linalg.solve(sl.transpose(-1, -2), u)  # C U
            b = torch.linalg.solve(sr.transpose(-1, -2), v)
            return a, b, 1 + alpha[:, :, None] * beta[:, None, :]
        return None

    def _forms(self) -> list[tuple[Tensor, Tensor, Tensor] | None]:
        cache = self.__dict__.setdefault("_fl_cache", {})
        if "forms" not in cache:
            cache["forms"] = [self._congruence(left, right) for _, left, right in self.pairs()]
        return cache["forms"]

    def _need_forms(self, what: str) -> list[tuple[Tensor, Tensor, Tensor]]:
        forms = self._forms()
        bad = [spec.name for spec, f in zip(self.specs, forms, strict=True) if f is None]
        if bad:
            raise NotImplementedError(
                f"KronSum has no closed-form {what} for blocks {bad} (rank > 2, or rank 2 with "
                "damping or a singular first term); use rank=1, damping=0 with rank=2, or "
                "fl.spectral for estimates"
            )
        return [f for f in forms if f is not None]

    def _solve_cols(self, rhs: Tensor) -> Tensor:
        tol = 1e-12 if self.dtype == torch.float64 else 1e-6
        outs = []
        for (spec, left, right), form in zip(self.pairs(), self._forms(), strict=True):
            x = rhs[spec.start : spec.stop]
            if form is not None:
                a, b, mu = form
                y = torch.linalg.solve(
                    a, torch.linalg.solve(b, spec.to_mat(x).transpose(-1, -2)).transpose(-1, -2)
                )
                y = y * pinv_scale(mu, -1.0) if bool((mu >= 0).all()) else y / mu
                y = torch.linalg.solve(a.transpose(-1, -2), y)
                y = torch.linalg.solve(b.transpose(-1, -2), y.transpose(-1, -2)).transpose(-1, -2)
                outs.append(spec.from_mat(y))
                continue
            ll, ql = sym_eigh(left[0])
            lr, qr = sym_eigh(right[0])
            scale = pinv_scale(ll[:, :, None] * lr[:, None, :] + self.damping, -1.0)

            def matmul(v, spec=spec, left=left, right=right):
                return spec.from_mat(_kron_apply(left, right, spec.to_mat(v))) + self.damping * v

            def precond(v, spec=spec, ql=ql, qr=qr, scale=scale):
                y = ql.transpose(-1, -2) @ spec.to_mat(v) @ qr
                return spec.from_mat(ql @ (y * scale) @ qr.transpose(-1, -2))

            outs.append(cg(matmul, x, tol=tol, preconditioner=precond)[0])
        return torch.cat(outs, dim=0)

    def logdet(self) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for spec, (a, b, mu) in zip(self.specs, self._need_forms("log-determinant"), strict=True):
            total = total + torch.log(mu).sum()
            total = total + 2 * (
                spec.cols * torch.linalg.slogdet(a)[1].sum()
                + spec.rows * torch.linalg.slogdet(b)[1].sum()
            )
        return total

    def _basis(self, power: float, inverse: bool) -> LinearOperator:
        tensors: list[Tensor] = []
        for spec, (a, b, mu) in zip(self.specs, self._need_forms("root"), strict=True):
            if bool((mu < 0).any()):
                raise ValueError(
                    f"the Kronecker sum of block '{spec.name}' is indefinite (a truncated "
                    "Van Loan-Pitsianis sum need not be PSD): it has no real root"
                )
            if inverse:  # X^{-T} diag(mu^{-1/2})
                a, b = torch.linalg.inv(a).transpose(-1, -2), torch.linalg.inv(b).transpose(-1, -2)
            tensors += [a, b, spec.from_mat(pinv_scale(mu, power)[None])[:, 0]]
        return KronBasis(*tensors, specs=self.specs)

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        from linear_operator.operators import RootLinearOperator

        return RootLinearOperator(self._basis(0.5, inverse=False))

    def root_inv_decomposition(
        self, initial_vectors=None, test_vectors=None, method=None
    ) -> LinearOperator:
        from linear_operator.operators import RootLinearOperator

        return RootLinearOperator(self._basis(-0.5, inverse=True))

    def _symeig(self, eigenvectors: bool = False, return_evals_as_lazy: bool | None = False):
        if any(r != 1 for r in self.ranks):
            raise NotImplementedError(
                "KronSum has a closed-form eigendecomposition only with one term per block (rank=1)"
            )
        evals = torch.cat(
            [
                spec.from_mat(mu[None])[:, 0]
                for spec, (_, _, mu) in zip(
                    self.specs, self._need_forms("eigendecomposition"), strict=True
                )
            ]
        )
        evecs = self._basis(0.0, inverse=False) if eigenvectors else None
        return evals, evecs

    def eigh(self) -> tuple[Tensor, LinearOperator]:
        return self._symeig(eigenvectors=True)
