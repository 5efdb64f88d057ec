r"""Kronecker block bookkeeping shared by KFAC-like operators.

A Kronecker block acts on the row-major matrix view M (groups, rows, cols) of a layer's
parameters: for Linear/Conv, rows are output channels (per group) and cols the inputs (patch
entries) followed by a bias column, M = [W | b]; for Embedding, M = W (vocabulary x features);
for a transposed convolution (``kernel`` > 0) the weight is stored (groups * in, rows, kernel)
and M[r, o, i * kernel + j] = W[r * in + i, o, j] (input channel, then kernel offset, on the
columns, as for a convolution).
The public vector order (weight row-major, then bias) is a fixed permutation of vec(M); ``to_mat``
and ``from_mat`` apply it by reshapes and a concatenation, never a permutation matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor


@dataclass(frozen=True)
class KronSpec:
    """Where a Kronecker block sits and how its slice maps to M (groups, rows, cols)."""

    name: str
    start: int
    stop: int
    groups: int
    rows: int
    cols: int
    has_weight: bool = True
    has_bias: bool = False
    left_is_a: bool = False  # Embedding: the left factor is the input covariance
    kernel: int = 0  # > 0: a transposed convolution's weight (groups * in, rows, kernel)

    @property
    def w_cols(self) -> int:
        return self.cols - (1 if self.has_bias else 0)

    def to_mat(self, x: Tensor) -> Tensor:
        """Block slice (p, m) -> (m, groups, rows, cols)."""
        m = x.shape[-1]
        out_rows = self.groups * self.rows
        parts = []
        offset = 0
        if self.has_weight and self.w_cols:
            w = x[: out_rows * self.w_cols]
            if self.kernel:  # (groups, in, rows, kernel) -> (groups, rows, in, kernel)
                c_in = self.w_cols // self.kernel
                w = w.reshape(self.groups, c_in, self.rows, self.kernel, m).transpose(1, 2)
            parts.append(w.reshape(out_rows, self.w_cols, m))
            offset = out_rows * self.w_cols
        if self.has_bias:
            parts.append(x[offset:].reshape(out_rows, 1, m))
        mat = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return mat.reshape(self.groups, self.rows, self.cols, m).permute(3, 0, 1, 2)

    def from_mat(self, mat: Tensor) -> Tensor:
        """(m, groups, rows, cols) -> block slice (p, m)."""
        m = mat.shape[0]
        out_rows = self.groups * self.rows
        full = mat.permute(1, 2, 3, 0).reshape(out_rows, self.cols, m)
        parts = []
        if self.has_weight and self.w_cols:
            w = full[:, : self.w_cols]
            if self.kernel:  # (groups, rows, in, kernel) -> (groups, in, rows, kernel)
                c_in = self.w_cols // self.kernel
                w = w.reshape(self.groups, self.rows, c_in, self.kernel, m).transpose(1, 2)
            parts.append(w.reshape(-1, m))
        if self.has_bias:
            parts.append(full[:, self.w_cols :].reshape(-1, m))
        return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def kron_matmul(spec: KronSpec, left: Tensor, right: Tensor, x: Tensor) -> Tensor:
    r"""(left kron right) x = vec(left X right) for a block slice x (p, m) with symmetric factors
    left (groups, rows, rows) and right (groups, cols, cols) (or unbatched (rows, rows),
    (cols, cols)); X = mat(x) (m, groups, rows, cols). O(rows^2 cols + rows cols^2) per column;
    differentiable in the factors."""
    return spec.from_mat(left @ spec.to_mat(x) @ right)


def kron_diagonal(spec: KronSpec, left_diag: Tensor, right_diag: Tensor) -> Tensor:
    """diag(left kron right) (p,) in the block's public order from diag(left) (groups, rows) and
    diag(right) (groups, cols): entry (g, i, j) of the matrix view is left_ii right_jj."""
    # g: group, i: row, j: column
    return spec.from_mat((left_diag[:, :, None] * right_diag[:, None, :])[None])[:, 0]


class KronBasis(LinearOperator):
    r"""E diag(s) over blocks, with E the Kronecker eigenbasis (Q_left kron Q_right) of each block:
    E diag(s) y = vec(Q_l Y Q_r^T) for Y = mat(s * y); with ``transposed`` the adjoint
    diag(s) E^T x = s * vec(Q_l^T X Q_r). Used for eigenvectors (s = 1) and roots (s = sqrt(lambda))."""

    def __init__(self, *tensors: Tensor, specs: tuple[KronSpec, ...], transposed: bool = False):
        super().__init__(*tensors, specs=specs, transposed=transposed)
        self.tensors = tensors
        self.specs = specs
        self.transposed = transposed

    def _size(self) -> torch.Size:
        p = self.specs[-1].stop
        return torch.Size([p, p])

    def _transpose_nonbatch(self) -> LinearOperator:
        return KronBasis(*self.tensors, specs=self.specs, transposed=not self.transposed)

    def _matmul(self, rhs: Tensor) -> Tensor:
        from fim_linops.operators.base import as_columns, from_columns

        cols, shape, vector = as_columns(rhs)
        outs = []
        for i, spec in enumerate(self.specs):
            ql, qr, s = self.tensors[3 * i : 3 * i + 3]
            x = cols[spec.start : spec.stop]
            if self.transposed:
                y = spec.to_mat(x)
                y = ql.transpose(-1, -2) @ y @ qr
                outs.append(spec.from_mat(y) * s[:, None])
            else:
                y = spec.to_mat(x * s[:, None])
                outs.append(spec.from_mat(ql @ y @ qr.transpose(-1, -2)))
        return from_columns(torch.cat(outs, dim=0), shape, vector)
