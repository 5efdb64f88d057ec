r"""Whether the layer rules are exact on this model: the checks that send a ruled layer to
torch.func (:meth:`Engine.demote`) or stop a build.

A rule computes a layer's statistics from its calls' (input, output-gradient) pairs, with the
examples along the first dim of each call. That is exact when

* the layer's parameters reach the output only through those calls (not through
  ``F.linear(x, layer.weight)``, a call by keyword that the hooks cannot see, or hooks that did
  not run): a walk of the autograd graph (engine/paths.py), which also finds reentrant
  activation checkpoints (an error: they hide parameters from the graph);
* every call has the examples along its first dim (not a time-major (T, N, D) sequence, examples
  flattened into (N*T, D) rows, or an input shared by all examples): the first dim of every call
  output is N, and is 1 in a forward of one example, which tells (T, N, D) from (N, T, D) even
  when T = N.

Both are checked on the first batch of a build (:func:`first_batch_checks`, about 10 us for the
walk and 0.1-0.3 ms for the forward of one example on the digits models); a build that finds a
layer restarts with it on torch.func (:class:`UnruledLayers`). Callers that hold the inputs
(the function-space paths) run the same checks before any batch, on a probe of two examples
(:func:`probe_checks`): a call shared by all examples keeps first dim 1 for any N, so one example
alone cannot show it. A later batch whose calls do not have its examples along dim 0 (possible
only when the checked first batch had one example) raises (:func:`check_example_major`).

The modules in ``rows_free`` (KFAC "expand" factors, sums over the rows of the calls) need less:
rows that each belong to one example, in any layout. Those whose calls fail the first-dim check
are judged by :func:`~fim_linops.engine.shared_rows.shared_rows` on the batch (n >= 2 examples):
kept when no row is shared by two examples (a (B, 2, D) input reshaped into (2B, D) rows), sent to
torch.func (an exact block) when one is (a position embedding called on arange(T)). A batch of one
example cannot share a row; the first later batch of two or more then judges them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence, Set
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fim_linops.data import PROBE_EXAMPLES, call_model, slice_examples
from fim_linops.engine.capture import Call, Capture, capturing
from fim_linops.engine.paths import CallNodes, scan_graph
from fim_linops.engine.ruled import RuledBlock
from fim_linops.engine.rules.base import LayerRule, ruled_type
from fim_linops.engine.shared_rows import SHARED_ROWS, shared_rows
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import tensor_output
from fim_linops.naming import class_name

#: why a ruled module goes through torch.func (:meth:`Engine.demote`)
OUTSIDE_CALLS = (
    "its parameters reach the output other than through its own calls (a direct use such as "
    "F.linear(x, module.weight), a call by keyword, or forward hooks that did not run, as in a "
    "torch.compile'd model: pass compiled._orig_mod)"
)
NOT_EXAMPLE_MAJOR = (
    "its calls do not have the examples along the first dim (a time-major (T, N, D) sequence, "
    "examples flattened into (N*T, D), or an input shared by all examples)"
)


class Checked(Protocol):
    """What the checks read of a build (an :class:`~fim_linops.engine.engine.Engine` or a view
    of one): the model and its layout, the ruled layers, ``index`` (module id -> position in
    ``ruled``), ``hooked`` (module id -> (module, rule), the modules whose calls are captured)
    ``rows_free`` (ids of the modules whose statistics take their calls' rows as they come: the
    example-major check asks only that no row be shared by two examples) and ``rows_checked``
    (the ids of ``rows_free`` found without shared rows on a batch of two or more examples)."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def layout(self) -> ParamLayout: ...

    @property
    def ruled(self) -> Sequence[RuledBlock]: ...

    @property
    def index(self) -> Mapping[int, int]: ...

    @property
    def hooked(self) -> dict[int, tuple[nn.Module, LayerRule]]: ...

    @property
    def rows_free(self) -> Set[int]: ...

    @property
    def rows_checked(self) -> set[int]: ...


class UnruledLayers(Exception):
    """The first forward found ruled modules whose rule would be wrong (``reasons``: id ->
    why): the caller restarts the build with them demoted (:meth:`Engine.demote`), beginning
    with this batch ``(x, y)``."""

    def __init__(self, reasons: dict[int, str], x: Any, y: Tensor | None):
        super().__init__(f"{len(reasons)} module(s) that the layer rules would get wrong")
        self.reasons = reasons
        self.batch = (x, y)


@contextmanager
def side_forward(engine: Checked, x: Any) -> Iterator[tuple[Any, dict[int, list[Call]]]]:
    """A forward of ``x`` outside the build, for checks: the calls' graph nodes are recorded
    (no features), the random state is restored afterwards (dropout draws)."""
    device = engine.layout.entries[0].param.device
    cuda = [device.index or 0] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=cuda),
        torch.enable_grad(),
        capturing(engine.hooked, features=False, reroute=getattr(engine, "reroute", ())) as cap,
    ):
        yield _logits(call_model(engine.model, x)), cap.calls


def _logits(f: Any) -> Any:
    """The output tensor the likelihood reads (the ``logits`` of a mapping or ``ModelOutput``),
    else ``f`` as it is (the build then reports what is wrong with it)."""
    try:
        return tensor_output(f)
    except TypeError:
        return f


def unruly(engine: Checked, f: Tensor, calls: dict[int, list[Call]], n: int) -> dict[int, str]:
    """id -> reason for the ruled modules whose rule would be wrong on this forward of ``n``
    examples: parameters that ``f`` reaches other than through their captured ``calls``, or a
    call output whose first dim is not ``n``. One walk of the graph (engine/paths.py), which
    also raises for a reentrant activation checkpoint."""
    if f.grad_fn is None:
        return {}
    watched = {id(e.param): rb.module for rb in engine.ruled for e in rb.block.entries}
    nodes = [
        CallNodes(engine.ruled[engine.index[key]].module, c.output_node, c.input_node)
        for key, cs in calls.items()
        for c in cs
    ]
    scan = scan_graph(f, nodes, watched)
    if scan.opaque:
        raise ValueError(
            "the model uses torch.utils.checkpoint with use_reentrant=True: the checkpointed "
            "block's parameters are invisible to the autograd graph (it is recomputed inside "
            "the backward), so neither the layer rules nor torch.func can take per-example "
            "gradients through it; pass use_reentrant=False (PyTorch's recommended mode, "
            "supported by dense, block_diag, diag, kfac and the NTK) or switch checkpointing "
            "off for the Fisher"
        )
    found = {
        id(rb.module): OUTSIDE_CALLS
        for rb in engine.ruled
        if any(id(e.param) in scan.outside for e in rb.block.entries)
    }
    for key, cs in calls.items():
        if key not in found and not _example_major(cs, n):
            found[key] = NOT_EXAMPLE_MAJOR
    return found


def _example_major(cs: list[Call], n: int) -> bool:
    return all(c.output.ndim > 0 and c.output.shape[0] == n for c in cs)


def _rows_verdicts(
    engine: Checked, f: Tensor, calls: dict[int, list[Call]], found: dict[int, str]
) -> dict[int, str]:
    """``found`` with the ``rows_free`` modules whose only fault is :data:`NOT_EXAMPLE_MAJOR`
    judged on their rows in this forward (``f``, n examples): kept (dropped from ``found``) when
    no row is shared by two examples, else :data:`SHARED_ROWS`. Kept ones are added to
    ``rows_checked`` when n >= 2 (a forward of one example cannot share a row: they are judged
    again on the first later batch of two or more)."""
    suspects = {
        k: [c.output for c in calls[k]]
        for k, why in found.items()
        if why == NOT_EXAMPLE_MAJOR
        and k in engine.rows_free
        and k in calls
        and all(c.output.ndim > 0 for c in calls[k])  # a scalar output has no rows
    }
    if not suspects:
        return found
    shared = shared_rows(f, suspects)
    n = f.shape[0] if f.ndim else 1
    if n >= 2:
        engine.rows_checked.update(suspects.keys() - shared)
    return {k: SHARED_ROWS if k in shared else why for k, why in found.items()
            if k in shared or k not in suspects}  # fmt: skip


def first_batch_checks(engine: Checked, x: Any, f: Tensor, cap: Capture) -> dict[int, str]:
    """:func:`unruly` on the first batch, and on a forward of its first example (with the
    batch's capture paused): a module whose call outputs keep their first dim when the batch
    shrinks to one example does not have the examples there."""
    n = f.shape[0]
    found = unruly(engine, f, cap.calls, n)
    with cap.paused():
        found = _one_example(engine, x, n) | forward_mismatch(engine, x) | found
    return _rows_verdicts(engine, f, cap.calls, found)


def probe_checks(engine: Checked, x: Any) -> dict[int, str]:
    """The checks of :func:`first_batch_checks` on an input the caller holds, before any batch
    runs (the function-space paths: Jacobian, NTK, GP kernel, Laplace predictives): side
    forwards of its first :data:`PROBE_EXAMPLES` examples and of its first one. A probe of one
    example (an input of one) cannot show a call shared by all examples; the rules are then
    exact on every batch of that input (each has one example)."""
    x = slice_examples(x, 0, PROBE_EXAMPLES)
    with side_forward(engine, x) as (f, calls):
        if not isinstance(f, Tensor) or f.ndim == 0:
            return {}
        n = f.shape[0]
        found = unruly(engine, f, calls, n)
        found = _one_example(engine, x, n) | forward_mismatch(engine, x) | found
        return _rows_verdicts(engine, f, calls, found)


def _one_example(engine: Checked, x: Any, n: int) -> dict[int, str]:
    """:func:`unruly` on a side forward of the first example of ``x`` (n examples), {} when
    n = 1 or the model cannot run one example (the n-example checks then stand alone)."""
    if n < 2:
        return {}
    try:
        with side_forward(engine, slice_examples(x, 0, 1)) as (f1, calls1):
            return unruly(engine, f1, calls1, 1) if isinstance(f1, Tensor) else {}
    except Exception:  # a model that cannot run one example: the full batch's checks
        return {}


def check_example_major(
    engine: Checked, f: Tensor, calls: dict[int, list[Call]], index: int
) -> None:
    """Raise when a call of a ruled module in batch ``index`` (output ``f``, n examples, after the
    checked first one) does not have the n examples along its first dim, or, for a module of
    ``rows_free`` not yet judged on two or more examples, has a row shared by two of them
    (:func:`~fim_linops.engine.shared_rows.shared_rows`, once per module). The first batch's
    checks cannot see a call shared by all examples when that batch has one example; a later,
    larger batch would then get a wrong (or mis-shaped) statistic from the rule. O(calls), no
    forward, but for that one judgement."""
    n = f.shape[0]
    bad = {key: NOT_EXAMPLE_MAJOR for key, cs in calls.items() if not _example_major(cs, n)}
    free = {k: why for k, why in bad.items() if k in engine.rows_free}
    if free:
        if n < 2:  # one example: no row is shared
            verdicts: dict[int, str] = {}
        else:
            unjudged = {k: why for k, why in free.items() if k not in engine.rows_checked}
            verdicts = _rows_verdicts(engine, f, calls, unjudged)
        bad = {k: why for k, why in bad.items() if k not in free} | verdicts
    if not bad:
        return
    names = ", ".join(
        f"'{rb.block.module_name}' ({class_name(rb.module)})"
        for rb in (engine.ruled[engine.index[key]] for key in bad)
    )
    what = (
        "are shared by the examples (an input without the examples' dim, such as the positions "
        "arange(T) of a position embedding), which a first batch of one example cannot show"
        if SHARED_ROWS in bad.values()
        else "do not have the examples along their first dim (a time-major (T, N, D) sequence, "
        "examples flattened into (N*T, D), or an input shared by all examples), which the checks "
        "of the first batch, of one example, cannot show"
    )
    raise ValueError(
        f"batch {index} ({n} examples): the calls of module {names} {what}; put a batch of two "
        "or more examples first (the module then goes through torch.func)"
    )


def forward_mismatch(engine: Checked, x: Any) -> dict[int, str]:
    """id -> reason for the ruled modules of a subclass that overrides ``forward`` (the rule
    serves the nearest ruled class in the hierarchy, rules/base.py) whose forward does not compute
    the ruled class's function: one forward without gradients of the first example, where a hook
    on each such module compares its output with the ruled class's ``forward`` on the same
    inputs (a forward that the ruled class's cannot even be called with, such as OPT's position
    embedding taking the attention mask, does not compute it). Nothing runs when no ruled module
    overrides ``forward``."""
    suspects = {}
    for rb in engine.ruled:
        cls = ruled_type(rb.module)
        if cls is not None and type(rb.module).forward is not cls.forward:
            suspects[id(rb.module)] = (rb.module, cls)
    if not suspects:
        return {}
    found: dict[int, str] = {}

    def make_hook(key: int, cls: type[nn.Module]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            try:
                ref = cls.forward(module, *args, **kwargs)
            except Exception:  # noqa: BLE001  (another signature: OPT's position embedding)
                ref = None
            ok = isinstance(output, Tensor) and isinstance(ref, Tensor)
            if ok and output.shape == ref.shape:
                tol = 1e-9 if output.dtype == torch.float64 else 1e-4
                scale = float(ref.abs().max()) if ref.numel() else 0.0
                ok = bool(torch.allclose(output, ref, rtol=tol, atol=tol * max(scale, 1e-30)))
            else:
                ok = False
            if not ok:
                found[key] = (
                    f"its forward ({class_name(module)}, a subclass of {class_name(cls)}) does not "
                    f"compute {class_name(cls)}'s function, so its rule does not apply"
                )

        return hook

    handles = [
        m.register_forward_hook(make_hook(key, cls), with_kwargs=True)
        for key, (m, cls) in suspects.items()
    ]
    device = engine.layout.entries[0].param.device
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            call_model(engine.model, slice_examples(x, 0, 1))
    finally:
        for h in handles:
            h.remove()
    return found


def check_uncalled(engine: Checked, f: Tensor, called: Any, index: int) -> None:
    """Ruled modules whose hooks did not fire in this forward (after the first, which is checked
    in full) get zero statistics, which is right only if the output does not depend on their
    parameters (an unused layer). Raise when it does: the hooks stopped running (a
    torch.compile'd model replaying a graph traced without them) or the forward changed with the
    batch; the build cannot switch the module to torch.func in mid-pass."""
    uncalled = [rb for rb in engine.ruled if id(rb.module) not in called]
    watched = {id(e.param): rb.module for rb in uncalled for e in rb.block.entries}
    if f.grad_fn is None or not scan_graph(f, [], watched).outside:
        return
    names = ", ".join(f"'{rb.block.module_name}' ({class_name(rb.module)})" for rb in uncalled)
    raise ValueError(
        f"batch {index}: the output depends on the parameters of module {names}, but the "
        "module's forward hooks did not run; a torch.compile'd model replays a graph traced "
        "without them: pass the uncompiled module (compiled._orig_mod), which has the same "
        "parameters"
    )
