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

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import EigenOperator, pinv_scale, sym_eigh
from fim_linops.operators.kron import KronBasis, KronSpec, kron_diagonal, kron_matmul


class KFAC(EigenOperator):
    structure = "kfac"

    def __init__(
        self, *factors: Tensor, specs: tuple[KronSpec, ...], damping: Tensor | None = None
    ):
        if len(factors) != 2 * len(specs):
            raise ValueError("KFAC needs a (left, right) factor pair per block spec")
        if damping is None:
            damping = torch.zeros((), dtype=factors[0].dtype, device=factors[0].device)
        super().__init__(*factors, specs=tuple(specs), damping=damping)
        self.factors = factors
        self.specs = tuple(specs)

    def _numel(self) -> int:
        return self.specs[-1].stop

    def pairs(self):
        """(spec, left (groups, rows, rows), right (groups, cols, cols)) per block."""
        for i, spec in enumerate(self.specs):
            yield spec, self.factors[2 * i], self.factors[2 * i + 1]

    def _scaled(self, c: Tensor) -> KFAC:
        f = [t * c if i % 2 == 0 else t for i, t in enumerate(self.factors)]
        return KFAC(*f, specs=self.specs, damping=self.damping * c)

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
        return sum(
            (
                left.diagonal(dim1=-2, dim2=-1).sum(-1) * right.diagonal(dim1=-2, dim2=-1).sum(-1)
            ).sum()
            for _, left, right in self.pairs()
        )

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

    def _eigenvalues(self) -> Tensor:
        return torch.cat(self._block_eigenvalues())

    def _basis(self, scales: list[Tensor]) -> LinearOperator:
        tensors = []
        for (_, ql, _, qr), s in zip(self._eigs(), scales, strict=True):
            tensors += [ql, qr, s]
        return KronBasis(*tensors, specs=self.specs)

    def _eigenvectors(self) -> LinearOperator:
        return self._basis([torch.ones_like(lam) for lam in self._block_eigenvalues()])

    def _root_tensor(self) -> LinearOperator:
        return self._basis([lam.clamp_min(0).sqrt() for lam in self._block_eigenvalues()])

    def _root_inv_tensor(self) -> LinearOperator:
        return self._basis([pinv_scale(lam, -0.5) for lam in self._block_eigenvalues()])
