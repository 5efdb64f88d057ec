"""A few examples of a model input, for the structural check of ``Engine(..., probe=x)``
(engine/paths.py) where the caller holds the inputs (NTK, Jacobians, Laplace predictives).
``fl.fisher`` checks the graph of its first batch instead and restarts if needed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

#: examples per probe: one runs every layer once, at the least cost
PROBE_EXAMPLES = 1


def first_examples(x: Any) -> Any:
    """The first PROBE_EXAMPLES examples of a model input, for ``Engine(..., probe=...)``."""
    return head(x, PROBE_EXAMPLES)


def head(x: Any, n: int) -> Any:
    """The first n examples of an input (tensor, tuple/list or dict of tensors)."""
    if isinstance(x, Tensor):
        return x[:n]
    if isinstance(x, Mapping):
        return {k: head(v, n) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(head(v, n) for v in x)
    return x
