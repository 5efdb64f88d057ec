"""Forward hooks that keep, for each call of each ruled module, its prepared input features and its
output tensor (to differentiate the back-propagated columns with respect to it).

The hook returns a clone of the output to the rest of the network, so that a later in-place
operation (``ReLU(inplace=True)``) cannot rewrite the tensor whose gradient we ask for. Hooks are
registered in a context manager and removed on exit, also when an exception flies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from fim_linops.engine.rules.base import LayerRule


@dataclass
class Call:
    """What one call of a module left behind: prepared features ``a`` and the output tensor."""

    a: Tensor
    output: Tensor


@dataclass
class Capture:
    """Calls per hooked module (keyed by id of the module), filled during one forward."""

    calls: dict[int, list[Call]] = field(default_factory=dict)

    def clear(self) -> None:
        self.calls.clear()


@contextmanager
def capturing(modules: dict[int, tuple[nn.Module, LayerRule]]) -> Iterator[Capture]:
    """Register forward hooks on ``modules`` (id -> (module, rule)) for the duration of the block."""
    capture = Capture()
    handles = []

    def make_hook(key: int, rule: LayerRule):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            if not isinstance(output, Tensor) or not output.requires_grad:
                return output
            capture.calls.setdefault(key, []).append(Call(rule.prepare(module, inputs, output), output))
            return output.clone()

        return hook

    try:
        for key, (module, rule) in modules.items():
            handles.append(module.register_forward_hook(make_hook(key, rule)))
        yield capture
    finally:
        for h in handles:
            h.remove()
        capture.clear()
