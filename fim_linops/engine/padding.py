r"""Embedding ``padding_idx`` rows in forward mode, as reverse mode defines them.

``F.embedding(ids, W, padding_idx=p)`` looks up row W[p] for the ids equal to p, but its backward
gives that row no gradient: d out[n, t] / d W = 0 where ids[n, t] = p. Forward mode (``jvp``,
dual numbers) differentiates the lookup itself and carries W[p]'s tangent to those positions, so
J v and J^T u would be the derivatives of two different functions: an implicit Fisher product
J^T H J v is then not the Fisher, and a Jacobian is not the adjoint of its transpose.

Zeroing W[p]'s tangent before the forward makes them agree only while W is used by nothing else:
a weight tied to an output layer (Gemma, OPT, BART, BERT's masked-LM head) does have a gradient at
row p through that layer. So the fix is made where the lookup happens: every ``F.embedding`` call
with a ``padding_idx`` returns (:func:`padding_rows_constant`)

    out' = out.detach() + keep * (out - out.detach()),   keep[n, t] = [ids[n, t] != p]

(out: (*ids.shape, D)). out' has out's values exactly (the second term is zero); its tangent and
its gradient vanish at the padding positions, as F.embedding's backward defines, in forward mode,
reverse mode and under vmap alike. Other uses of W (a tied head) are untouched. Applied by the
torch function mode of :mod:`.forward_mode`, it catches the lookup wherever it is called from:
nn.Embedding, its subclasses (scaled word embeddings), and functional calls in a model's forward.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


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


def padding_rows_constant(args: tuple, kwargs: dict[str, Any], out: Any) -> Any:
    """``out`` of ``F.embedding(*args, **kwargs)``, made out' (module docstring) when the call
    has a ``padding_idx``; else as it is."""
    pad = _padding_idx(args, kwargs)
    ids = kwargs.get("input", args[0] if args else None)
    if pad is None or not isinstance(ids, Tensor) or not isinstance(out, Tensor):
        return out
    keep = (ids != pad).unsqueeze(-1).to(out.dtype)  # (*ids.shape, 1)
    fixed = out.detach()
    return fixed + keep * (out - fixed)


__all__ = ["padding_rows_constant"]
