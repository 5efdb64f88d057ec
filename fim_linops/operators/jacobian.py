r"""The Jacobian of a model's outputs w.r.t. its trainable parameters, as a LinearOperator.

J has shape (N*C, P): row n*C + c is d f_c(x_n) / d theta, columns in the public vector order.
Stored: a snapshot theta_0 of the parameters (constructor tensors), the model and the input
batches. ``J @ V`` (V (P, M)) is forward mode, one forward per batch carrying all M tangents
(``jvp`` under ``vmap``); ``J.T @ U`` (U (N*C, M)) is reverse mode, one forward and one batched
backward per batch (``vjp`` under ``vmap``). ``to_dense()`` goes through the engine's layer rules
(per-example gradients, one backward of the C identity columns per batch).
"""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from fim_linops.data import batch_size
from fim_linops.engine.functional import jvp_columns, output_fn, vjp_columns
from fim_linops.engine.outputs import jacobian_matrix
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood, tensor_output
from fim_linops.memory_guard import DEFAULT_MAX_BYTES, check_bytes
from fim_linops.operators.base import as_columns, from_columns


class Outputs(Likelihood):
    r"""Not a likelihood: the selection of model outputs a Jacobian or NTK is taken of, in the
    engine's interface. Outputs of any shape (N, *) are flattened to (N, C); ``index`` keeps one
    column. The back-propagated columns are the identity, S = I_C (N, C, C), so the engine's
    per-example gradients are the Jacobian rows."""

    name = "outputs"

    def __init__(self, index: int | None = None):
        self.index = index

    def check_output(self, f: Tensor) -> Tensor:
        f = tensor_output(f)
        if f.ndim == 0:
            raise ValueError("the model output is a scalar; it needs a leading batch dimension")
        f = f.reshape(f.shape[0], -1)
        if self.index is None:
            return f
        if not -f.shape[1] <= self.index < f.shape[1]:
            raise ValueError(
                f"output index {self.index} is out of range for a model with {f.shape[1]} outputs"
            )
        return f[:, self.index : self.index + 1] if self.index != -1 else f[:, -1:]

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return eye.expand(f.shape[0], -1, -1)

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        return v


class Jacobian(LinearOperator):
    r"""J (N*C, P), or J^T (P, N*C) with ``transposed``.

    Args:
        params: theta_0, one tensor per layout entry.
        model, layout: the network and its parameter layout.
        batches: the inputs, a list of model inputs (each a tensor or tuple/dict of tensors).
        outputs: the output selection (:class:`Outputs`).
        n_outputs: C, the number of selected outputs per example.
        transposed: represent J^T (P, N*C) instead.
        max_bytes: memory guard of ``to_dense()`` (and of dense NTKs built from this Jacobian);
            None: no limit.
    """

    def __init__(
        self,
        *params: Tensor,
        model: nn.Module,
        layout: ParamLayout,
        batches: list[Any],
        outputs: Outputs,
        n_outputs: int,
        transposed: bool = False,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ):
        super().__init__(
            *params,
            model=model,
            layout=layout,
            batches=batches,
            outputs=outputs,
            n_outputs=n_outputs,
            transposed=transposed,
            max_bytes=max_bytes,
        )
        self.max_bytes = max_bytes
        self.params = params
        self.model = model
        self.layout = layout
        self.batches = batches
        self.outputs = outputs
        self.n_outputs = n_outputs
        self.transposed = transposed
        self.sizes = [batch_size(x) for x in batches]

    @property
    def n_examples(self) -> int:
        return sum(self.sizes)

    def _param_dict(self) -> dict[str, Tensor]:
        return {e.name: p for e, p in zip(self.layout.entries, self.params, strict=True)}

    def _size(self) -> torch.Size:
        rows, p = self.n_examples * self.n_outputs, self.layout.numel
        return torch.Size([p, rows]) if self.transposed else torch.Size([rows, p])

    def _transpose_nonbatch(self) -> LinearOperator:
        return Jacobian(
            *self.params,
            model=self.model,
            layout=self.layout,
            batches=self.batches,
            outputs=self.outputs,
            n_outputs=self.n_outputs,
            transposed=not self.transposed,
            max_bytes=self.max_bytes,
        )

    def jvp(self, v: Tensor) -> Tensor:
        """J V for V (P, M) -> (N*C, M): one forward per batch with M tangents."""
        params = self._param_dict()
        tangents = self.layout.unflatten(v.T)
        outs = []
        for x in self.batches:
            jv = jvp_columns(output_fn(self.model, x, self.outputs), params, tangents)  # (M, n, C)
            outs.append(jv.reshape(jv.shape[0], -1))
        return torch.cat(outs, dim=1).T

    def vjp(self, u: Tensor) -> Tensor:
        """J^T U for U (N*C, M) -> (P, M): one forward and a batched backward per batch."""
        params = self._param_dict()
        m, c = u.shape[1], self.n_outputs
        out = None
        lo = 0
        for x, n in zip(self.batches, self.sizes, strict=True):
            cot = u[lo * c : (lo + n) * c].T.reshape(m, n, c)
            g = self.layout.flatten(
                vjp_columns(output_fn(self.model, x, self.outputs), params, cot)
            )
            out = g if out is None else out + g
            lo += n
        assert out is not None  # a Jacobian has at least one batch
        return out.T

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        with torch.enable_grad():
            out = self.vjp(cols) if self.transposed else self.jvp(cols)
        return from_columns(out, shape, vector)

    def check_dense(self) -> None:
        """Raise :class:`~fim_linops.memory_guard.MemoryLimitError` if the dense (N*C, P)
        Jacobian exceeds ``max_bytes``."""
        check_bytes(
            "the dense Jacobian",
            (self.n_examples * self.n_outputs, self.layout.numel),
            self.params[0].dtype,
            self.max_bytes,
            "use products J @ V and J.T @ U (matrix-free), fl.ntk(..., structure='implicit'), "
            "fewer inputs or params=... (a subset of the parameters)",
        )

    def to_dense(self) -> Tensor:
        self.check_dense()
        j = jacobian_matrix(self.model, self.layout, self.batches, self.outputs)
        return j.T if self.transposed else j

    def __repr__(self) -> str:
        return f"Jacobian(shape={tuple(self.shape)}, transposed={self.transposed})"
