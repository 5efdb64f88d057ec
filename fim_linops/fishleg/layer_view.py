r"""The matrix view of a Linear/Conv2d layer's parameters: the one-group Kronecker layout of
:mod:`fim_linops.operators.kron`, and the dense form of a block operator.

A layer with weight W (out, in) (Conv2d: (out, in, kh, kw) read as (out, in*kh*kw)) and optional
bias b (out,) is the row-major matrix U = [W | b] of shape (rows, cols) = (out, in' + has_bias).
The public vector order of the block is W row-major, then b; vec(U) row-major interleaves the bias
column. :func:`block_layout` is that view as a :class:`~fim_linops.operators.kron.KronSpec` with
one group: ``spec.to_mat`` takes public block columns (M, k) to U (k, 1, rows, cols) and
``spec.from_mat`` back, by a split, a reshape and a concatenation (never a permutation matrix),
the same code as the KFAC operators use.

Shapes: M = rows * cols entries of the block, k right-hand-side columns.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.kron import KronSpec


def block_layout(rows: int, cols: int, has_bias: bool) -> KronSpec:
    """The layout of a block U = [W | b] of shape (rows, cols) (one group, slice 0..M)."""
    return KronSpec("", 0, rows * cols, 1, rows, cols, has_bias=has_bias)


class DenseByProducts(LinearOperator):
    """A LinearOperator whose dense form is its product with the identity (one product of
    ``shape[-1]`` columns; for the small per-layer blocks of Q and their roots)."""

    def to_dense(self) -> Tensor:
        eye = torch.eye(self.shape[-1], dtype=self.dtype, device=self.device)
        return self._matmul(eye)
