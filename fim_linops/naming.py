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


def _shortest_path(cls: type) -> str:
    """``package.Name`` for the shortest importable parent package that exposes ``cls`` under its
    name, else ``cls.__module__.__qualname__``."""
    parts = cls.__module__.split(".")
    best = cls.__module__
    for i in range(len(parts) - 1, 0, -1):  # timm.layers.linear -> timm.layers -> timm
        parent = ".".join(parts[:i])
        mod = sys.modules.get(parent)
        if mod is None or getattr(mod, cls.__qualname__, None) is not cls:
            break
        best = parent
    return f"{best}.{cls.__qualname__}"


def class_name(obj: object) -> str:
    """The qualified class name of a module (or of a class) as errors and warnings print it."""
    cls = obj if isinstance(obj, type) else type(obj)
    module = cls.__module__ or ""
    if module == "torch.nn" or module.startswith("torch.nn."):
        path = _shortest_path(cls)
        return "nn." + path.removeprefix("torch.nn.")
    if module == "__main__":
        torch_twin = getattr(nn, cls.__qualname__, None)
        return f"__main__.{cls.__qualname__}" if isinstance(torch_twin, type) else cls.__qualname__
    return _shortest_path(cls)
