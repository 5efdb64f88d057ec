r"""Embedding ``padding_idx`` rows in forward mode, as reverse mode defines them.

``F.embedding(ids, W, padding_idx=p)`` looks up row W[p] for the ids equal to p, but its backward
gives that row no gradient: d out[n, t] / d W = 0 where ids[n, t] = p. Forward mode (``jvp``,
dual numbers) differentiates the lookup itself and carries W[p]'s tangent to those positions, so
J v and J^T u would be the derivatives of two different functions: an implicit Fisher product
J^T H J v is then not the Fisher, and a Jacobian is not the adjoint of its transpose.

Zeroing W[p]'s tangent before the forward makes them agree only while W is used by nothing else:
a weight tied to an output layer (Gemma, OPT, BERT's masked-LM head, T5) does have a gradient at
row p through that layer. So the fix is made where the lookup happens: within
:class:`PaddingRowsConstant`, every ``F.embedding`` call with a ``padding_idx`` returns

    out' = out.detach() + keep * (out - out.detach()),   keep[n, t] = [ids[n, t] != p]

(out: (*ids.shape, D)). out' has out's values exactly (the second term is zero); its tangent and
its gradient vanish at the padding positions, as F.embedding's backward defines, in forward mode,
reverse mode and under vmap alike. Other uses of W (a tied head) are untouched. The mode catches
the lookup wherever it is called from: nn.Embedding, its subclasses (scaled word embeddings),
and functional calls in a model's own forward.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def _padding_idx(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The ``padding_idx`` of an ``F.embedding(input, weight, padding_idx, ...)`` call, made
    non-negative as F.embedding does; None when there is none."""
    pad = kwargs.get("padding_idx", args[2] if len(args) > 2 else None)
    if pad is None:
        return None
    weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
    if pad < 0 and isinstance(weight, Tensor):
        pad += weight.shape[0]
    return int(pad)


class PaddingRowsConstant(TorchFunctionMode):
    """Within this mode, ``F.embedding`` with a ``padding_idx`` has no derivative at the
    padding positions in any mode of differentiation (module docstring). Other functions run
    unchanged (the mode is off inside its own handler, so the lookup itself is not re-entered)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not F.embedding:
            return out
        pad = _padding_idx(args, kwargs)
        if pad is None:
            return out
        ids = kwargs.get("input", args[0] if args else None)
        if not isinstance(ids, Tensor) or not isinstance(out, Tensor):
            return out
        keep = (ids != pad).unsqueeze(-1).to(out.dtype)  # (*ids.shape, 1)
        fixed = out.detach()
        return fixed + keep * (out - fixed)


def padding_rows_constant() -> PaddingRowsConstant:
    """The context (``with padding_rows_constant(): ...``) of :class:`PaddingRowsConstant`."""
    return PaddingRowsConstant()


__all__ = ["PaddingRowsConstant", "padding_rows_constant"]
