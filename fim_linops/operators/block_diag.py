r"""Block-diagonal Fisher: one dense block per layer (the trainable parameters of one module),
F ~ blockdiag_l F_ll with F_ll = 1/N sum_n J_{n,l}^T H_n J_{n,l}.

Stored: the blocks (p_l x p_l), contiguous and in the public vector order, and once needed their
eigendecompositions. Products O(sum_l p_l^2 M); solve, logdet, root and powers per block, damping
exact.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import EigenOperator, pinv_scale, sym_eigh


class BlockDiag(EigenOperator):
    structure = "block_diag"

    def __init__(self, *blocks: Tensor, damping: Tensor | None = None, names: tuple[str, ...] = ()):
        if not blocks:
            raise ValueError("BlockDiag needs at least one block")
        if damping is None:
            damping = torch.zeros((), dtype=blocks[0].dtype, device=blocks[0].device)
        super().__init__(*blocks, damping=damping, names=tuple(names))
        self.blocks = blocks
        self.names = tuple(names)
        sizes = [b.shape[-1] for b in blocks]
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)

    def _numel(self) -> int:
        return self.offsets[-1]

    def _spans(self):
        return zip(self.blocks, self.offsets[:-1], self.offsets[1:], strict=False)

    def _scaled(self, c: Tensor) -> BlockDiag:
        return BlockDiag(*[b * c for b in self.blocks], damping=self.damping * c, names=self.names)

    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        return torch.cat([b @ rhs[lo:hi] for b, lo, hi in self._spans()], dim=0)

    def _diagonal_undamped(self) -> Tensor:
        return torch.cat([b.diagonal() for b in self.blocks])

    def _frobenius_sq_undamped(self) -> Tensor:
        return sum(((b**2).sum() for b in self.blocks), self.damping.new_zeros(()))

    def to_dense(self) -> Tensor:
        return torch.block_diag(*self.blocks) + self.damping * torch.eye(
            self._numel(), dtype=self.dtype, device=self.device
        )

    def _eigs(self) -> list[tuple[Tensor, Tensor]]:
        cache = self.__dict__.setdefault("_fl_cache", {})
        if "eig" not in cache:
            cache["eig"] = [sym_eigh(b) for b in self.blocks]
        return cache["eig"]

    def _eig_apply(self, rhs: Tensor, fn) -> Tensor:
        outs = []
        for (lam, q), lo, hi in zip(
            self._eigs(), self.offsets[:-1], self.offsets[1:], strict=False
        ):
            outs.append(q @ (fn(lam + self.damping)[:, None] * (q.T @ rhs[lo:hi])))
        return torch.cat(outs, dim=0)

    def _eigenvalues(self) -> Tensor:
        return torch.cat([lam for lam, _ in self._eigs()]) + self.damping

    def _eigenvectors(self) -> LinearOperator:
        return BlockDiag(*[q for _, q in self._eigs()], names=self.names)

    def _root_tensor(self) -> LinearOperator:
        return BlockDiag(
            *[q * (lam + self.damping).clamp_min(0).sqrt() for lam, q in self._eigs()],
            names=self.names,
        )

    def _root_inv_tensor(self) -> LinearOperator:
        return BlockDiag(*[q * pinv_scale(lam + self.damping, -0.5) for lam, q in self._eigs()])
