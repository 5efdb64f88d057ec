r"""Eigenvalue-corrected KFAC (George et al., NeurIPS 2018):
F ~ blockdiag_l E_l diag(s_l) E_l^T with E_l = Q_L kron Q_R the KFAC eigenbasis of layer l.

Q_L (groups, rows, rows) and Q_R (groups, cols, cols) are the eigenvectors of the KFAC factors over
the row-major matrix view M of the layer (see :mod:`fim_linops.operators.kron`); the eigenvalues are
refitted to the second moments of the per-example gradients in that basis,
s[r, i, j] = 1/N sum_{n,k} (Q_L^T M_{nk} Q_R)[r, i, j]^2, which is the Frobenius-optimal diagonal
in the basis E: ||F - E diag(s) E^T||_F <= ||F - KFAC||_F.

Stored: Q_L, Q_R and s per block (no P x P matrix). Products vec(Q_L (s * (Q_L^T X Q_R)) Q_R^T)
cost O(rows^2 cols + rows cols^2) per block and column; solve, log-determinant, root, real powers
and eigh are exact (eigenvalues s + damping), damping included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from fim_linops.operators.kron_blocks import KronEigenOperator


class EKFAC(KronEigenOperator):
    r"""Eigenvalue-corrected Kronecker-factored Fisher.

    Args:
        tensors: per block, in ``specs`` order, ``q_left`` (groups, rows, rows), ``q_right``
            (groups, cols, cols) (orthogonal) and ``scales`` s (groups, rows, cols) >= 0.
        specs: the Kronecker block layout (:class:`KronSpec`).
        damping: scalar delta; the operator is F + delta I.
    """

    structure = "ekfac"
    per_spec, scaled_slot, needs = 3, 2, "(q_left, q_right, scales)"

    def triples(self) -> Iterator[Any]:
        """(spec, q_left, q_right, scales) per block."""
        return self.blocks()

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        return self._eig_apply_shift(rhs, lambda lam: lam, damped=False)

    def _diagonal_undamped(self) -> Tensor:
        # diag(E diag(s) E^T)[r, a, b] = sum_{i,j} Q_L[r,a,i]^2 s[r,i,j] Q_R[r,b,j]^2
        outs = []
        for spec, ql, qr, s in self.triples():
            d = (ql**2) @ s @ (qr**2).transpose(-1, -2)
            outs.append(spec.from_mat(d[None])[:, 0])
        return torch.cat(outs)

    def _trace_undamped(self) -> Tensor:
        return sum(s.sum() for _, _, _, s in self.triples())

    def _frobenius_sq_undamped(self) -> Tensor:
        return sum((s**2).sum() for _, _, _, s in self.triples())

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self._numel(), dtype=self.dtype, device=self.device))

    # -- eigen structure -------------------------------------------------------------------------
    def _eig_apply_shift(self, rhs: Tensor, fn, damped: bool = True) -> Tensor:
        outs = []
        shift = self.damping if damped else 0.0
        for spec, ql, qr, s in self.triples():
            x = spec.to_mat(rhs[spec.start : spec.stop])  # (m, groups, rows, cols)
            y = ql.transpose(-1, -2) @ x @ qr  # into the eigenbasis
            y = y * fn(s + shift)
            outs.append(spec.from_mat(ql @ y @ qr.transpose(-1, -2)))
        return torch.cat(outs, dim=0)

    def _eig_apply(self, rhs: Tensor, fn) -> Tensor:
        return self._eig_apply_shift(rhs, fn)

    def _block_eigenvalues(self) -> list[Tensor]:
        """Per block, the damped eigenvalues in the public order of the block, (p,)."""
        return [spec.from_mat((s + self.damping)[None])[:, 0] for spec, _, _, s in self.triples()]

    def _eigenbases(self) -> list[tuple[Tensor, Tensor]]:
        return [(ql, qr) for _, ql, qr, _ in self.triples()]
