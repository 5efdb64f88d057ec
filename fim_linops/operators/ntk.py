r"""Implicit finite-width NTK: Theta(x1, x2) = J1 J2^T, never materialised.

Shapes: N1, N2 examples, C selected outputs, M right-hand sides, P parameters.

``outputs="full"`` (or one output index): Theta (N1*C, N2*C), row n*C + c, and
Theta V = J1 (J2^T V): per batch of x2 one forward and one batched backward (vjp under vmap), then
per batch of x1 one forward carrying the M tangents (jvp under vmap).

``outputs="sum"`` (``trace``): Theta_sum[n, m] = sum_c <J1[n, c], J2[m, c]> of shape (N1, N2) (the
trace over outputs, neural-tangents' ``trace_axes``); its products take C M columns:
Theta_sum v = sum_c J1_c (J2_c^T v).

Dense form and diagonal come from the engine's per-layer Gram blocks (:mod:`fim_linops.engine.gram`):
:func:`gram_of` and :func:`gram_diagonal_of`, also used by ``fl.ntk(structure="dense")``, the GP
kernel and the Laplace predictives.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.engine.engine import Engine
from fim_linops.engine.gram import gram_diagonal, gram_matrix
from fim_linops.engine.outputs import outputs_engine
from fim_linops.memory_guard import check_bytes
from fim_linops.operators.base import as_columns, from_columns
from fim_linops.operators.jacobian import Jacobian
from fim_linops.state import preserved_state


class NTK(LinearOperator):
    r"""Theta = J1 J2^T (or its trace over outputs).

    Args:
        j1: the Jacobian of the first inputs (N1*C, P).
        j2: the Jacobian of the second inputs, or None for Theta(x1, x1) (symmetric).
        trace: sum over the outputs instead of the (N*C, N*C) matrix.
    """

    def __init__(self, j1: Jacobian, j2: Jacobian | None = None, *, trace: bool = False):
        if j2 is None:
            super().__init__(j1, trace=trace)
        else:
            super().__init__(j1, j2, trace=trace)
        self.j1 = j1
        self.j2 = j2
        self.trace = trace

    @property
    def symmetric(self) -> bool:
        return self.j2 is None

    def _right(self) -> Jacobian:
        return self.j1 if self.j2 is None else self.j2

    def _size(self) -> torch.Size:
        c = 1 if self.trace else self.j1.n_outputs
        return torch.Size([self.j1.n_examples * c, self._right().n_examples * c])

    def _transpose_nonbatch(self) -> LinearOperator:
        if self.j2 is None:
            return self
        return NTK(self.j2, self.j1, trace=self.trace)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        with torch.enable_grad():
            if not self.trace:
                out = self.j1.jvp(self._right().vjp(cols))
            else:
                # c, d: outputs; n: example; m: column. Cotangent (n, c) = v[n, m] e_c per (c, m)
                c, m = self.j1.n_outputs, cols.shape[1]
                eye = torch.eye(c, dtype=cols.dtype, device=cols.device)
                cot = torch.einsum("nm,cd->ndcm", cols, eye).reshape(-1, c * m)
                jv = self.j1.jvp(self._right().vjp(cot))  # (N1*C, C*M)
                out = jv.reshape(-1, c, c, m).diagonal(dim1=1, dim2=2).sum(-1)
        return from_columns(out, shape, vector)

    def to_dense(self) -> Tensor:
        return gram_of(self.j1, self.j2, self.trace)

    def _diagonal(self) -> Tensor:
        if not self.symmetric:
            return super()._diagonal()
        return gram_diagonal_of(self.j1, self.trace)

    def __repr__(self) -> str:
        return f"NTK(shape={tuple(self.shape)}, trace={self.trace}, symmetric={self.symmetric})"


def _engine(j1: Jacobian, j2: Jacobian | None = None) -> Engine:
    """:func:`outputs_engine` for the batches of one or two Jacobians."""
    batches = [j1.batches] if j2 is None else [j1.batches, j2.batches]
    return outputs_engine(j1.model, j1.layout, j1.outputs, *batches)


def gram_of(j1: Jacobian, j2: Jacobian | None, trace: bool) -> Tensor:
    """The dense NTK J1 J2^T (or its trace over outputs) through the per-layer Gram rules."""
    c = 1 if trace else j1.n_outputs
    n2 = j1.n_examples if j2 is None else j2.n_examples
    check_bytes(
        "the dense NTK",
        (j1.n_examples * c, n2 * c),
        j1.params[0].dtype,
        j1.max_bytes,
        "use structure='implicit' (products J1 (J2^T V), never the Gram), outputs='sum' or "
        "fewer inputs",
    )
    with preserved_state(j1.model):
        engine = _engine(j1, j2)
        b1 = [(x, None) for x in j1.batches]
        b2 = None if j2 is None else [(x, None) for x in j2.batches]
        return gram_matrix(engine, b1, b2, trace=trace)


def gram_diagonal_of(j: Jacobian, trace: bool) -> Tensor:
    """diag(J J^T) (or its trace over outputs) without the Gram."""
    with preserved_state(j.model):
        return gram_diagonal(_engine(j), [(x, None) for x in j.batches], trace=trace)
