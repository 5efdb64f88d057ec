r"""Active dropout: a model left in training mode draws new dropout masks at every forward, so a
Fisher, Jacobian or NTK computed from it is that of random sub-networks (another one for each
batch and, for implicit operators, for each product), not of the model.

The entry points see dropout *modules* (``nn.Dropout``, ``nn.Dropout1d/2d/3d``,
``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``: the subclasses of
``nn.modules.dropout._DropoutNd``) in training mode with ``p > 0`` before anything runs. A
functional ``F.dropout(x, p, training=self.training)`` or ``scaled_dot_product_attention(...,
dropout_p=p)`` in a forward (Hugging Face's attention dropout) cannot be told from the outside;
:func:`functional_dropout` recognises such a call as the transformed forwards
(:mod:`.forward_mode`) make it, and :func:`warn_functional_dropout` says so once per computation.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.nn.functional as F
from torch import nn

from fim_linops.naming import class_name

#: at most this many dropout modules are named in the warning
NAMED = 4


def active_dropout(model: nn.Module) -> list[str]:
    """``'name' (nn.Dropout, p=0.1)`` for each dropout module of ``model`` that is in training
    mode with p > 0, in ``named_modules()`` order."""
    return [
        f"'{name or '<model>'}' ({class_name(m)}, p={m.p:g})"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]


def warn_active_dropout(model: nn.Module, what: str, stacklevel: int = 3) -> None:
    """A ``UserWarning`` naming the active dropout modules of ``model`` and ``model.eval()``.

    Args:
        model: the model a computation is about to run.
        what: what is computed, e.g. "the Fisher".
        stacklevel: passed to :func:`warnings.warn` from here: 2 is the caller of this
            function, the default 3 its caller (the user's call of an entry point that calls
            this directly).
    """
    found = active_dropout(model)
    if not found:
        return
    more = f" and {len(found) - NAMED} more" if len(found) > NAMED else ""
    warnings.warn(
        f"{what} is computed with dropout active: module {', '.join(found[:NAMED])}{more} "
        f"{'is' if len(found) == 1 else 'are'} in training mode, so every forward draws new "
        "dropout masks and the result is that of random sub-networks, not of the model. Call "
        "model.eval() first (fim_linops leaves the mode as it finds it)",
        UserWarning,
        stacklevel=stacklevel,
    )


#: F.* dropout -> the default of its ``training`` argument; every one is f(input, p, training, ...)
_DROPOUTS: dict[Any, bool] = {
    F.dropout: True,
    F.dropout1d: True,
    F.dropout2d: True,
    F.dropout3d: True,
    F.alpha_dropout: False,
    F.feature_alpha_dropout: False,
}


def _arg(args: tuple, kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    return kwargs.get(name, args[index] if len(args) > index else default)


def functional_dropout(func: Any, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """A description of the call ``func(*args, **kwargs)`` when it draws a dropout mask (an F.*
    dropout in training mode with p > 0, or scaled_dot_product_attention with dropout_p > 0),
    else None."""
    if func is F.scaled_dot_product_attention:
        p = _arg(args, kwargs, 4, "dropout_p", 0.0)
        return f"scaled_dot_product_attention(dropout_p={p:g})" if p > 0 else None
    if func not in _DROPOUTS:
        return None
    p = _arg(args, kwargs, 1, "p", 0.5)
    training = _arg(args, kwargs, 2, "training", _DROPOUTS[func])
    return f"{func.__name__}(p={p:g}, training=True)" if training and p > 0 else None


def warn_functional_dropout(call: str) -> None:
    """A ``UserWarning``: the forward being differentiated draws dropout masks by ``call``."""
    warnings.warn(
        f"the model's forward calls {call}: it draws new dropout masks at every forward, so "
        "Jacobian products, implicit Fisher products and the other torch.func computations are "
        "those of random sub-networks (another one for each product), not of the model. Call "
        "model.eval() first, or set the dropout probability to 0 (Hugging Face: "
        "attention_dropout=0.0)",
        UserWarning,
        stacklevel=2,
    )
