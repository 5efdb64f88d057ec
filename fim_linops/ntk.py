r"""Function-space operators: the Jacobian J of the outputs and the finite-width NTK J1 J2^T.

Shapes: N examples, C outputs per example (the model output flattened per example), P trainable
parameters in the public vector order. Rows are example-major: index n*C + c.

* ``jacobian(model, x)``: (N*C, P); products by forward mode (J V) and reverse mode (J^T U).
* ``ntk(model, x1, x2)``: Theta = J1 J2^T, (N1*C, N2*C); ``outputs="sum"`` gives the trace over the
  outputs sum_c J1_c J2_c^T (N1, N2), an int c the NTK of output c (N1, N2).
  ``structure="dense"`` builds the Gram through the per-layer rules (Linear:
  (A1 A2^T + 1) * (G1 G2^T), Conv from unfolded patches, Embedding from token matches; torch.func
  per-example gradients for the rest), streaming over batches of x1 and x2 with one forward and
  one batched backward per batch (symmetric blocks computed once when x2 is None);
  ``"implicit"`` multiplies J1 (J2^T V) without the Gram; ``"lowrank"`` is the root operator of
  the dense Jacobian(s), J1 J2^T.
"""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import (
    DenseLinearOperator,
    LinearOperator,
    MatmulLinearOperator,
    RootLinearOperator,
)
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from fim_linops.data import batch_size, call_model
from fim_linops.engine.dropout import warn_active_dropout
from fim_linops.enums import ParsedEnum
from fim_linops.layout import ParamLayout
from fim_linops.memory_guard import DEFAULT_MAX_BYTES
from fim_linops.operators.jacobian import Jacobian, Outputs
from fim_linops.operators.ntk import NTK, gram_of
from fim_linops.options import DEFAULT_BATCH_SIZE, BuildOptions
from fim_linops.state import preserved_state

__all__ = ["DEFAULT_BATCH_SIZE", "NTKStructure", "jacobian", "ntk", "split_inputs"]


class NTKStructure(ParsedEnum):
    IMPLICIT = "implicit"
    DENSE = "dense"
    LOWRANK = "lowrank"

    @classmethod
    def _kind(cls) -> str:
        return "NTK structure"

    @classmethod
    def _choices(cls) -> str:
        return (
            "'implicit' (products J1 (J2^T V)), 'dense' (the Gram from per-layer rules) or "
            "'lowrank' (root operator of the Jacobians)"
        )


def split_inputs(x: Any, size: int | None) -> list[Any]:
    """Model inputs (a tensor or tuple/dict of tensors, examples first) -> a list of batches."""
    n = batch_size(x)
    size = n if size is None else int(size)
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {size}")
    return [
        tree_map(lambda t, lo=lo: t[lo : lo + size] if isinstance(t, Tensor) else t, x)
        for lo in range(0, n, size)
    ]


def _outputs(outputs: str | int | None) -> tuple[Outputs, bool]:
    """The output selection and whether to trace over the outputs."""
    if outputs is None or outputs == "full":
        return Outputs(None), False
    if outputs == "sum":
        return Outputs(None), True
    if isinstance(outputs, int) and not isinstance(outputs, bool):
        return Outputs(outputs), False
    raise ValueError(f"outputs must be 'full', 'sum' or an output index, got {outputs!r}")


def _n_outputs(model: nn.Module, x: Any, sel: Outputs) -> int:
    with torch.no_grad():
        first = tree_map(lambda t: t[:1] if isinstance(t, Tensor) else t, x)
        return sel.check_output(call_model(model, first)).shape[1]


def _jacobian_op(
    model: nn.Module, layout: ParamLayout, x: Any, sel: Outputs, options: BuildOptions
) -> Jacobian:
    """The Jacobian operator of ``sel``'s outputs at inputs ``x`` over ``layout``'s parameters, in
    batches of ``options.batch_size`` examples, its ``to_dense()`` guarded by
    ``options.max_bytes``."""
    batches = split_inputs(x, options.batch_size)
    params = tuple(e.param.detach() for e in layout.entries)
    with preserved_state(model):
        c = _n_outputs(model, batches[0], sel)
    return Jacobian(
        *params,
        model=model,
        layout=layout,
        batches=batches,
        outputs=sel,
        n_outputs=c,
        max_bytes=options.max_bytes,
    )


def jacobian(
    model: nn.Module,
    x: Any,
    params: Any = None,
    outputs: int | None = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Jacobian:
    r"""The Jacobian J = d f(x) / d theta as a LinearOperator of shape (N*C, P), row n*C + c.

    Args:
        model: any ``nn.Module``; its output per example is flattened to C values.
        x: the inputs, a tensor or a tuple/dict of tensors with the examples first.
        params: None (all trainable parameters) or an iterable of parameters/modules.
        outputs: None (all outputs) or one output index (then C = 1).
        batch_size: examples per forward pass in products (None: all at once).
        max_bytes: limit of ``J.to_dense()`` (N*C x P entries) before it allocates; a larger
            Jacobian raises a ``ValueError`` (None: no limit).

    ``J @ V`` is forward mode, ``J.T @ U`` reverse mode (both batched over the columns);
    ``J.to_dense()`` goes through the layer rules.
    """
    sel, _ = _outputs(outputs)
    options = BuildOptions.of(params=params, batch_size=batch_size, max_bytes=max_bytes)
    layout = ParamLayout.from_model(model, options.params)
    warn_active_dropout(model, "the Jacobian")
    return _jacobian_op(model, layout, x, sel, options)


def ntk(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    structure: str | NTKStructure = "implicit",
    outputs: str | int = "full",
    params: Any = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> LinearOperator:
    r"""The finite-width NTK Theta(x1, x2) = J(x1) J(x2)^T as a LinearOperator.

    Args:
        model: any ``nn.Module`` (BatchNorm in eval mode); left exactly as found.
        x1: inputs (tensor or tuple/dict of tensors, examples first).
        x2: inputs as x1; None: Theta(x1, x1).
        structure: "implicit" (products J1 (J2^T V)), "dense" (the Gram from per-layer rules,
            O(batches) forward/backward passes) or "lowrank" (RootLinearOperator(J) /
            MatmulLinearOperator(J1, J2^T) with the dense Jacobians).
        outputs: "full" (N1*C, N2*C), row n*C + c; "sum": (N1, N2), the trace over outputs
            sum_c <J1[n, c], J2[m, c]>; an int c: (N1, N2), the NTK of output c.
        params: None (all trainable parameters) or an iterable of parameters/modules.
        batch_size: examples per forward/backward pass (None: all at once).
        max_bytes: limit of what "dense" (the N1*C x N2*C Gram) and "lowrank" (the N*C x P
            Jacobians) allocate, checked before allocating, also for ``to_dense()`` of the
            implicit operator; over it a ``ValueError`` names what fits (None: no limit).
    """
    struct = NTKStructure.parse(structure)
    sel, trace = _outputs(outputs)
    options = BuildOptions.of(params=params, batch_size=batch_size, max_bytes=max_bytes)
    layout = ParamLayout.from_model(model, options.params)
    warn_active_dropout(model, "the NTK")
    j1 = _jacobian_op(model, layout, x1, sel, options)
    j2 = None if x2 is None else _jacobian_op(model, layout, x2, sel, options)
    if struct is NTKStructure.IMPLICIT:
        return NTK(j1, j2, trace=trace)
    if struct is NTKStructure.DENSE:
        return DenseLinearOperator(gram_of(j1, j2, trace))

    def root(j: Jacobian) -> Tensor:  # (N*C, P), or (N, C*P) for the trace over outputs
        d = j.to_dense()
        return d.reshape(j.n_examples, -1) if trace else d

    r1 = root(j1)
    if j2 is None:
        return RootLinearOperator(r1)
    return MatmulLinearOperator(r1, root(j2).mT)
