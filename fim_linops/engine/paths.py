r"""Which ruled modules' parameters reach the model output only through the module's own calls.

A layer rule computes a parameter's gradients from the (input, output-gradient) pairs of its
module's calls, which is exact only if the parameter enters the output through those calls
alone. It does not when the forward also uses the parameter directly
(``F.linear(h, self.emb.weight)`` next to ``self.emb(x)``, ``F.linear(x, self.lin.weight)``
instead of ``self.lin(x)``), and it sees nothing when the module's forward hooks do not run
(a ``torch.compile``'d model traced without them); the rule would then silently return a wrong
(or zero) block. This module finds such parameters by walking the autograd graph of one forward.

The walk starts at the output's ``grad_fn``. Entering the ``grad_fn`` of a captured call's output
starts that call's context; reaching the ``grad_fn`` of that call's input ends it. A parameter's
``AccumulateGrad`` node reached outside a context of its own module is a use the rule cannot see.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class CallNodes:
    """The autograd nodes that delimit one call of a ruled module: ``out`` is the ``grad_fn`` of
    its output, ``inp`` that of its input (None when the input needs no gradient: data, or
    integer indices)."""

    module: nn.Module
    out: object
    inp: object | None


#: autograd nodes behind which parameters are used without edges in the graph: the reentrant
#: activation checkpoint recomputes its block inside its backward (torch.utils.checkpoint with
#: use_reentrant=True); neither the layer rules nor torch.func can see through it
OPAQUE_NODES = ("CheckpointFunctionBackward",)


@dataclass(frozen=True)
class GraphScan:
    """What one walk of a forward's graph found: ``outside``, the ids of watched parameters
    reached other than through a call of their own module; ``opaque``, the names of the
    :data:`OPAQUE_NODES` types in the graph."""

    outside: frozenset[int]
    opaque: frozenset[str]


def scan_graph(f: Tensor, calls: Iterable[CallNodes], watched: dict[int, nn.Module]) -> GraphScan:
    """One walk of the autograd graph of ``f``: the parameters in ``watched`` (id of parameter ->
    its module) that it reaches other than through a call of their own module, and the opaque
    nodes. O(nodes x nesting) Python work."""
    by_out: dict[int, CallNodes] = {}
    for c in calls:
        if c.out is not None:
            by_out[id(c.out)] = c
    outside: set[int] = set()
    opaque: set[str] = set()
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[object, CallNodes | None]] = [(f.grad_fn, None)]
    while stack:
        node, ctx = stack.pop()
        if node is None:
            continue
        if ctx is not None and node is ctx.inp:  # the call's input: back outside the call
            ctx = None
        entered = by_out.get(id(node))
        if entered is not None:
            ctx = entered
        key = (id(node), id(ctx))
        if key in seen:
            continue
        seen.add(key)
        if type(node).__name__ in OPAQUE_NODES:
            opaque.add(type(node).__name__)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None and id(variable) in watched:
            if ctx is None or ctx.module is not watched[id(variable)]:
                outside.add(id(variable))
        for nxt, _ in getattr(node, "next_functions", ()):
            stack.append((nxt, ctx))
    return GraphScan(frozenset(outside), frozenset(opaque))
