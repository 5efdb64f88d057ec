"""Forward hooks that keep, for each call of each ruled module, its prepared input features and its
output tensor (to differentiate the back-propagated columns with respect to it).

A later in-place operation (``ReLU(inplace=True)``, ``x += ...``) would rewrite the tensors we keep
(the output whose gradient we ask for, the input features). The hooks record each kept tensor's
version counter; :meth:`Capture.modified` tells whether any changed during the forward, and the
engine then reruns the batch in ``safe`` mode, where the hook hands a clone of the output to the
rest of the network and keeps private copies of the inputs. Hooks are registered in a context
manager and removed on exit, also when an exception flies.

A module whose forward applies parameters where no hook can see them (``nn.MultiheadAttention``
hands its weights to ``F.multi_head_attention_forward``) has a capture forward instead
(rules/base.py, ``CAPTURE_FORWARDS``): the same function, with its projections as calls that are
recorded like a hook's (:data:`Record`); it replaces the module's forward for the duration of the
block only (an instance attribute, removed on exit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor, nn

from fim_linops.engine.rules.base import CAPTURE_FORWARDS, LayerRule


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


#: what a capture forward (rules/base.py, ``CAPTURE_FORWARDS``) calls for each hookable piece of
#: its computation: ``record(module, inputs, output)`` keeps the call as a forward hook would and
#: returns the tensor the rest of the forward must use (a clone in safe mode)
Record = Callable[[nn.Module, tuple, Tensor], Tensor]


@contextmanager
def capturing(
    modules: dict[int, tuple[nn.Module, LayerRule]],
    safe: bool = False,
    features: bool = True,
    reroute: Sequence[nn.Module] = (),
) -> Iterator[Capture]:
    """Register forward hooks on ``modules`` (id -> (module, rule)) for the duration of the block.
    ``features=False`` records the calls' graph nodes only (no prepared input features).
    ``reroute``: modules whose forward is replaced, for the block, by their type's capture
    forward (rules/base.py, ``CAPTURE_FORWARDS``), which records its own calls when the module is
    in ``modules`` and calls its submodules so that their hooks run (restored on exit)."""
    capture = Capture()
    handles = []
    swapped: list[tuple[nn.Module, object]] = []

    def keep(key: int, rule: LayerRule, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
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

    def make_hook(key: int, rule: LayerRule):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            return keep(key, rule, module, inputs, output)

        return hook

    def make_record(module: nn.Module) -> Record | None:
        entry = modules.get(id(module))
        if entry is None:
            return None
        rule = entry[1]
        return lambda m, inputs, output: keep(id(module), rule, m, inputs, output)

    try:
        for module in reroute:
            fn = CAPTURE_FORWARDS[ruled_type_of(module)]
            swapped.append((module, module.__dict__.get("forward", _ABSENT)))
            object.__setattr__(module, "forward", partial(fn, module, make_record(module)))
        for key, (module, rule) in modules.items():
            if any(module is m for m in reroute):
                continue  # its capture forward records its calls
            handles.append(module.register_forward_hook(make_hook(key, rule), prepend=True))
        yield capture
    finally:
        for h in handles:
            h.remove()
        for module, previous in reversed(swapped):
            if previous is _ABSENT:
                del module.forward
            else:
                object.__setattr__(module, "forward", previous)
        capture.clear()


_ABSENT = object()


def ruled_type_of(module: nn.Module) -> type[nn.Module]:
    """The nearest class in the module's hierarchy with a capture forward."""
    for cls in type(module).__mro__:
        if cls in CAPTURE_FORWARDS:
            return cls
    raise KeyError(f"no capture forward for {type(module).__name__}")


def rerouted(model: nn.Module, hooked: dict[int, tuple[nn.Module, LayerRule]]) -> tuple:
    """The modules of ``model`` that need their capture forward: those of a type with one (and
    that type's forward, not an override) whose own calls, or whose direct submodules' calls,
    are captured."""
    if not CAPTURE_FORWARDS:
        return ()
    out = []
    for m in model.modules():
        cls = next((c for c in type(m).__mro__ if c in CAPTURE_FORWARDS), None)
        if cls is None or type(m).forward is not cls.forward:
            continue  # a subclass with its own forward keeps it (the checks then judge it)
        if id(m) in hooked or any(id(c) in hooked for c in m.children()):
            out.append(m)
    return tuple(out)
