"""Forward hooks that keep, for each call of each ruled module, its prepared input features and its
output tensor (to differentiate the back-propagated columns with respect to it).

A later in-place operation (``ReLU(inplace=True)``, ``x += ...``) would rewrite the tensors we keep
(the output whose gradient we ask for, the input features). The hooks record each kept tensor's
version counter; :meth:`Capture.modified` tells whether any changed during the forward, and the
engine then reruns the batch in ``safe`` mode, where the hook hands a clone of the output to the
rest of the network and keeps private copies of the inputs. Hooks are registered in a context
manager and removed on exit, also when an exception flies.
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
    watched: tuple[tuple[Tensor, int], ...] = ()  # (tensor, version at capture)
    input_node: object | None = None  # grad_fn of the call's input at the call (engine/paths.py)
    output_node: object | None = None  # grad_fn of the output at the call (before in-place ops)


@dataclass
class Capture:
    """Calls per hooked module (keyed by id of the module), filled during one forward."""

    calls: dict[int, list[Call]] = field(default_factory=dict)
    active: bool = True  # False while a side forward runs (its calls are not this batch's)

    def clear(self) -> None:
        self.calls.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing during the block (a check's own forward of other inputs)."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def modified(self) -> bool:
        """Whether an in-place operation changed a kept tensor after its capture."""
        return any(
            t._version != v for calls in self.calls.values() for c in calls for t, v in c.watched
        )


@contextmanager
def capturing(
    modules: dict[int, tuple[nn.Module, LayerRule]], safe: bool = False, features: bool = True
) -> Iterator[Capture]:
    """Register forward hooks on ``modules`` (id -> (module, rule)) for the duration of the block.
    ``features=False`` records the calls' graph nodes only (no prepared input features)."""
    capture = Capture()
    handles = []

    def make_hook(key: int, rule: LayerRule):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            if (
                not capture.active
                or not inputs
                or not isinstance(output, Tensor)
                or not output.requires_grad
            ):
                # no positional input (called by keyword): not captured; the module then counts
                # as used outside its calls (engine/paths.py) and goes through torch.func
                return output
            node = inputs[0].grad_fn if isinstance(inputs[0], Tensor) else None
            if not features:
                capture.calls.setdefault(key, []).append(
                    Call(output, output, input_node=node, output_node=output.grad_fn)
                )
                return output
            if safe:
                inputs = tuple(i.clone() if isinstance(i, Tensor) else i for i in inputs)
                a = rule.prepare(module, inputs, output)
                capture.calls.setdefault(key, []).append(
                    Call(a, output, input_node=node, output_node=output.grad_fn)
                )
                return output.clone()
            a = rule.prepare(module, inputs, output)
            watched = [(output, output._version)]
            if isinstance(inputs[0], Tensor):
                watched.append((inputs[0], inputs[0]._version))
            capture.calls.setdefault(key, []).append(
                Call(a, output, tuple(watched), node, output.grad_fn)
            )
            return output

        return hook

    try:
        for key, (module, rule) in modules.items():
            handles.append(module.register_forward_hook(make_hook(key, rule), prepend=True))
        yield capture
    finally:
        for h in handles:
            h.remove()
        capture.clear()
