r"""Active dropout: a model left in training mode draws new dropout masks at every forward, so a
Fisher, Jacobian or NTK computed from it is that of random sub-networks (another one for each
batch and, for implicit operators, for each product), not of the model.

Only dropout *modules* (``nn.Dropout``, ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout``,
``nn.FeatureAlphaDropout``: the subclasses of ``nn.modules.dropout._DropoutNd``) in training
mode with ``p > 0`` are seen; a functional ``F.dropout(x, training=self.training)`` in a forward
is not (the entry points cannot tell it from the outside).
"""

from __future__ import annotations

import warnings

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
