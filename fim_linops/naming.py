"""How errors and warnings name a module's class: qualified, so that a subclass never reads as
the torch class it derives from (``timm.layers.Linear``, not ``Linear``).

``class_name(nn.Linear(2, 2))`` is ``"nn.Linear"``; a class of another package is named by the
shortest public path that holds it (``timm.layers.Linear`` for ``timm.layers.linear.Linear``);
a class defined in a script (``__main__``) by its own name, unless that reads as a ``torch.nn``
class (``__main__.Linear``).
"""

from __future__ import annotations

import sys

from torch import nn


def _qualname(cls: type) -> str:
    """The class's qualified name, less the ``<locals>`` of a class defined in a function."""
    return cls.__name__ if "<locals>" in cls.__qualname__ else cls.__qualname__


def _shortest_path(cls: type) -> str:
    """``package.Name`` for the shortest importable parent package that exposes ``cls`` under its
    name, else ``cls.__module__.__qualname__``."""
    parts = cls.__module__.split(".")
    best = cls.__module__
    for i in range(len(parts) - 1, 0, -1):  # timm.layers.linear -> timm.layers -> timm
        parent = ".".join(parts[:i])
        mod = sys.modules.get(parent)
        if mod is None or getattr(mod, _qualname(cls), None) is not cls:
            break
        best = parent
    return f"{best}.{_qualname(cls)}"


def class_name(obj: object) -> str:
    """The qualified class name of a module (or of a class) as errors and warnings print it."""
    cls = obj if isinstance(obj, type) else type(obj)
    module = cls.__module__ or ""
    if module == "torch.nn" or module.startswith("torch.nn."):
        path = _shortest_path(cls)
        return "nn." + path.removeprefix("torch.nn.")
    if module == "__main__":
        name = _qualname(cls)
        return f"__main__.{name}" if isinstance(getattr(nn, name, None), type) else name
    return _shortest_path(cls)
