r"""Block-diagonal operator over the contiguous blocks of the flat parameter vector.

B = blockdiag(B_1, ..., B_m), B_i of shape (r_i, c_i) (square for Q itself; rectangular for roots
such as a Kronecker-sum root (M, 2M)). The row blocks are the layers' slices of the public flat
order (``torch.nn.utils.parameters_to_vector``), in order. A product costs the sum of the blocks'.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator, RootLinearOperator
from torch import Tensor

from fim_linops.operators.base import as_columns, from_columns


class BlockDiagonal(LinearOperator):
    r"""blockdiag(B_1, ..., B_m) of shape (sum r_i, sum c_i); used as ``FishLeg.inverse_fisher``,
    where it approximates (F + damping I)^-1 in the public parameter order."""

    def __init__(self, *blocks: LinearOperator):
        if not blocks:
            raise ValueError("BlockDiagonal needs at least one block")
        super().__init__(*blocks)
        self.blocks = tuple(blocks)
        self._rows = [b.shape[-2] for b in blocks]
        self._cols = [b.shape[-1] for b in blocks]

    def _size(self) -> torch.Size:
        return torch.Size([sum(self._rows), sum(self._cols)])

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        parts = torch.split(cols, self._cols, dim=0)
        out = torch.cat([b._matmul(p) for b, p in zip(self.blocks, parts, strict=True)], dim=0)
        return from_columns(out, shape, vector)

    def _transpose_nonbatch(self) -> LinearOperator:
        return BlockDiagonal(*[b.mT for b in self.blocks])

    def _diagonal(self) -> Tensor:
        return torch.cat([b._diagonal() for b in self.blocks])

    def to_dense(self) -> Tensor:
        return torch.block_diag(*[b.to_dense() for b in self.blocks])

    def root_decomposition(self, method: str | None = None) -> RootLinearOperator:
        """Exact root blockdiag(S_1, ..., S_m) from each block's exact root (S_i S_i^T = B_i)."""
        roots = [b.root_decomposition(method=method).root for b in self.blocks]
        return RootLinearOperator(BlockDiagonal(*roots))

    def __repr__(self) -> str:
        return f"BlockDiagonal(P={self.shape[-2]}, blocks={len(self.blocks)})"
