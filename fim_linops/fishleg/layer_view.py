r"""The matrix view of a Linear/Conv2d layer's parameters, and right-hand-side bookkeeping.

A layer with weight W (out, in) (Conv2d: (out, in, kh, kw) read as (out, in*kh*kw)) and optional
bias b (out,) is the row-major matrix U = [W | b] of shape (rows, cols) = (out, in' + has_bias).
The public vector order of the block is W row-major, then b; vec(U) row-major interleaves the bias
column. ``to_mat`` and ``from_mat`` convert by a split, a reshape and a concatenation (never a
permutation matrix).

Shapes: M = rows * cols entries of the block, k right-hand-side columns.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_mat(x: Tensor, rows: int, cols: int, has_bias: bool) -> Tensor:
    """Public block columns (M, k) -> U of shape (k, rows, cols)."""
    k = x.shape[-1]
    if not has_bias:
        return x.mT.reshape(k, rows, cols)
    nw = rows * (cols - 1)
    w = x[:nw].mT.reshape(k, rows, cols - 1)
    b = x[nw:].mT.reshape(k, rows, 1)
    return torch.cat([w, b], dim=-1)


def from_mat(u: Tensor, has_bias: bool) -> Tensor:
    """U of shape (k, rows, cols) -> public block columns (M, k)."""
    k = u.shape[0]
    if not has_bias:
        return u.reshape(k, -1).mT
    w = u[..., :-1].reshape(k, -1)
    b = u[..., -1]
    return torch.cat([w, b], dim=-1).mT


def as_columns(rhs: Tensor) -> tuple[Tensor, tuple[int, ...], bool]:
    """(P,) or (..., P, m) -> (P, m') with any batch folded into the columns; and how to undo it."""
    if rhs.ndim == 1:
        return rhs[:, None], (), True
    batch = tuple(rhs.shape[:-2])
    cols = rhs.movedim(-2, 0).reshape(rhs.shape[-2], -1)
    return cols, (*batch, rhs.shape[-1]), False


def from_columns(out: Tensor, shape: tuple[int, ...], vector: bool) -> Tensor:
    """Inverse of :func:`as_columns` for a result with ``out.shape[0]`` rows."""
    if vector:
        return out[:, 0]
    return out.reshape(out.shape[0], *shape).movedim(0, -2)
