"""Leave the model exactly as found: parameters, buffers, .grad, train/eval mode, hooks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore train/eval flags and ``.grad`` of every parameter on exit, also on exceptions.
    (The engine never calls ``.backward()`` and removes its own hooks; this is the safety net.)"""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, g in grads:
            p.grad = g
