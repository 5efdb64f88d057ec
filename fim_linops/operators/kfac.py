r"""Kronecker-factored Fisher: F ~ blockdiag_l (Left_l kron Right_l) over the row-major matrix view
M_l of each layer (see :mod:`fim_linops.operators.kron`).

For Linear and Conv layers (Martens & Grosse 2015; Grosse & Martens 2016) Left = G = 1/N sum g g^T
over the gradients w.r.t. the layer outputs and Right = A = 1/(N T) sum [a;1][a;1]^T over its
inputs (patches for convolutions, one pair per group), M = [W | b]; the public vector order (W, then
b) is a fixed permutation of vec(M). Embedding layers have A on the left (vocabulary rows).

Stored: the factors and, once needed, their eigendecompositions. (L kron R) vec(M) = vec(L M R)
costs O(rows^2 cols + rows cols^2) per block and column; solve, logdet, root, powers and eigh are
exact through the factor eigendecompositions: the eigenvalues of a block are
lambda_L[i] lambda_R[j] (+ damping).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from fim_linops.operators.base import sym_eigh
from fim_linops.operators.kron import kron_diagonal, kron_matmul
from fim_linops.operators.kron_blocks import KronEigenOperator, trace_of_pairs


class KFAC(KronEigenOperator):
    """Kronecker-factored Fisher (the module docstring gives the math and the costs).

    Args:
        tensors: per block, in ``specs`` order, ``left`` (groups, rows, rows) and ``right``
            (groups, cols, cols).
        specs: the Kronecker block layout (:class:`KronSpec`).
        damping: scalar delta; the operator is F + delta I.
    """

    structure = "kfac"

    @property
    def factors(self) -> tuple[Tensor, ...]:
        return self.tensors

    def pairs(self) -> Iterator[Any]:
        """(spec, left (groups, rows, rows), right (groups, cols, cols)) per block."""
        return self.blocks()

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        outs = [
            kron_matmul(spec, left, right, rhs[spec.start : spec.stop])
            for spec, left, right in self.pairs()
        ]
        return torch.cat(outs, dim=0)

    def _diagonal_undamped(self) -> Tensor:
        return torch.cat(
            [
                kron_diagonal(
                    spec, left.diagonal(dim1=-2, dim2=-1), right.diagonal(dim1=-2, dim2=-1)
                )
                for spec, left, right in self.pairs()
            ]
        )

    def _trace_undamped(self) -> Tensor:
        return trace_of_pairs(self.pairs())

    def _frobenius_sq_undamped(self) -> Tensor:
        return sum(
            ((left**2).sum((-1, -2)) * (right**2).sum((-1, -2))).sum()
            for _, left, right in self.pairs()
        )

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self._numel(), dtype=self.dtype, device=self.device))

    # -- eigen structure -------------------------------------------------------------------------
    def _eigs(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per block (lambda_L (g, rows), Q_L, lambda_R (g, cols), Q_R)."""
        cache = self.__dict__.setdefault("_fl_cache", {})
        if "eig" not in cache:
            # factors are small: decompose them in float64 even for a float32 operator
            cache["eig"] = [
                (*sym_eigh(left, upcast=True), *sym_eigh(right, upcast=True))
                for _, left, right in self.pairs()
            ]
        return cache["eig"]

    def _block_eigenvalues(self) -> list[Tensor]:
        """Per block, the damped eigenvalues in the public order of the block, (p,)."""
        out = []
        for spec, (ll, _, lr, _) in zip(self.specs, self._eigs(), strict=True):
            lam = ll[:, :, None] * lr[:, None, :] + self.damping  # (groups, rows, cols)
            out.append(spec.from_mat(lam[None])[:, 0])
        return out

    def _eig_apply(self, rhs: Tensor, fn) -> Tensor:
        outs = []
        for spec, (ll, ql, lr, qr) in zip(self.specs, self._eigs(), strict=True):
            x = spec.to_mat(rhs[spec.start : spec.stop])
            y = ql.transpose(-1, -2) @ x @ qr  # into the eigenbasis
            y = y * fn(ll[:, :, None] * lr[:, None, :] + self.damping)
            outs.append(spec.from_mat(ql @ y @ qr.transpose(-1, -2)))
        return torch.cat(outs, dim=0)

    def _eigenbases(self) -> list[tuple[Tensor, Tensor]]:
        return [(ql, qr) for _, ql, _, qr in self._eigs()]
