r"""The torch.func path: per-example gradients of parameters that have no layer rule, and exact
Jacobian-vector products for implicit operators.

Shapes: N examples, C outputs, K columns, M right-hand sides.

Per-example gradients: for example n and column k, J_n^T V[k, n] = vjp of f(theta; x_n) at V[k, n],
as ``vmap`` over n of (``vjp`` then ``vmap`` over k).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from fim_linops.data import batch_size, slice_examples
from fim_linops.engine.forward_mode import transformed_forward
from fim_linops.layout import ParamEntry
from fim_linops.likelihoods import Likelihood
from fim_linops.naming import class_name


def _call(model: nn.Module, params: dict[str, Tensor], x: Any) -> Tensor:
    """model(x) at ``params``, the model's other parameters as constants (detached: a result
    differentiated w.r.t. ``params`` must not track the other parameters, which would put every
    statistic built from it on the autograd graph); within :func:`.forward_mode.transformed_forward`
    (math attention, padding rows, no checkpointing), since every caller differentiates this
    forward by forward mode or under vmap."""
    fixed = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    params = {**{n: t for n, t in fixed.items() if n not in params}, **params}
    with transformed_forward(model):
        if isinstance(x, dict):
            return functional_call(model, params, (), x)
        if isinstance(x, (tuple, list)):
            return functional_call(model, params, tuple(x))
        return functional_call(model, params, (x,))


class _Batching(Enum):
    """How per-example gradients are vectorised over the examples (tried in this order)."""

    SHARED = "vmap over examples, parameters shared (the fast path)"
    PER_EXAMPLE = "vmap over examples with a per-example (expanded) copy of the parameters"
    LOOP = "a loop over the examples, vmap over the columns only"


class FunctionalModel:
    """The model as a function of a subset of its parameters (``entries``), the others fixed.

    Per-example gradients vmap over the examples. Some modules' backward formulas cannot run
    under that vmap while the parameters are unbatched: the recurrent layers (nn.RNN, nn.LSTM,
    nn.GRU) accumulate weight gradients in place into unbatched buffers, and nn.PReLU's batching
    rule mis-broadcasts. On such an error the next strategy of :class:`_Batching` is taken and
    kept for this instance: the recurrent layers work with per-example parameter copies
    (expanded views, still vectorised); what still fails runs one example at a time, with a
    warning, since that is slow. Gradients of the wrong shape count as such an error (nn.PReLU
    with one column broadcasts them over the examples). An error that the loop raises too is the
    model's own and propagates.
    """

    def __init__(self, model: nn.Module, entries: Sequence[ParamEntry]):
        self.model = model
        self.entries = list(entries)
        self._batching = _Batching.SHARED

    def params(self) -> dict[str, Tensor]:
        return {e.name: e.param.detach() for e in self.entries}

    def per_example_grads(
        self,
        x: Any,
        v: Tensor,
        lo: int,
        hi: int,
        likelihood: Likelihood,
        params: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """name -> (K, hi-lo, *shape): J_n^T V[k, n] for the examples lo:hi."""
        if not self.entries:
            return {}
        params = self.params() if params is None else params
        xs = slice_examples(x, lo, hi)
        vs = v[:, lo:hi].transpose(0, 1)  # (n, K, C)

        def one(x_n: Any, v_n: Tensor, p_n: dict[str, Tensor]) -> dict[str, Tensor]:
            """(K, *shape) gradients of example x_n (no example dim) at its K columns v_n."""

            def f(p: dict[str, Tensor]) -> Tensor:
                x_b = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x_n)
                return likelihood.check_output(_call(self.model, p, x_b))[0]

            pullback = vjp(f, p_n)[1]
            return vmap(pullback)(v_n)[0]

        n = vs.shape[0]
        while True:
            try:
                if self._batching is _Batching.SHARED:
                    out = vmap(one, in_dims=(0, 0, None), randomness="different")(xs, vs, params)
                elif self._batching is _Batching.PER_EXAMPLE:
                    expanded = {k: t.expand(n, *t.shape) for k, t in params.items()}
                    out = vmap(one, randomness="different")(xs, vs, expanded)
                else:  # examples one at a time: a fallback, not a hot path
                    rows = [one(_index(xs, i), vs[i], params) for i in range(n)]
                    out = {name: torch.stack([r[name] for r in rows]) for name in rows[0]}
                _check_shapes(out, params, vs.shape[:2])
                break
            except torch.OutOfMemoryError:
                raise  # not a batching failure: the next strategies need more memory, not less
            except RuntimeError:
                if self._batching is _Batching.LOOP:
                    with transform_errors("per-example gradients by torch.func"):
                        raise
                self._batching = (
                    _Batching.PER_EXAMPLE if self._batching is _Batching.SHARED else _Batching.LOOP
                )
                if self._batching is _Batching.LOOP:
                    warnings.warn(
                        "torch.func cannot vmap the per-example gradients of "
                        f"{self._module_names()} over the examples; computing them one example "
                        "at a time (correct, but slow for large batches)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        return {name: g.transpose(0, 1) for name, g in out.items()}  # name -> (K, n, *shape)

    def _module_names(self) -> str:
        """'name' (qualified class) of each module that owns one of the parameters."""
        modules = dict(self.model.named_modules())
        names = sorted({e.module_name for e in self.entries})
        return ", ".join(f"'{n or '<root>'}' ({class_name(modules[n])})" for n in names)


def _check_shapes(out: dict[str, Tensor], params: dict[str, Tensor], lead: torch.Size) -> None:
    """Raise RuntimeError unless every gradient has shape (n, K, *param.shape): some batching
    rules (nn.PReLU's, with one column) return gradients broadcast over the examples instead of
    failing."""
    for name, p in params.items():
        if out[name].shape != (*lead, *p.shape):
            raise RuntimeError(
                f"per-example gradient of '{name}' has shape {tuple(out[name].shape)}, "
                f"expected {(*lead, *p.shape)}"
            )


def _index(x: Any, i: int) -> Any:
    """Example i of a batch (the example dim removed), for every tensor in the pytree."""
    return tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, x)


#: what torch says when a model cannot go through forward-mode AD or torch.func transforms
_UNSUPPORTED = (
    "saved tensor hooks",  # activation checkpointing, use_reentrant=False
    "setup_context",  # an autograd.Function without functorch support (reentrant checkpoint)
    "jvp function for custom autograd.Function",  # forward mode through such a Function
    "torch.utils.checkpoint",  # checkpoint's own errors (CheckpointError)
)


@contextmanager
def transform_errors(what: str) -> Iterator[None]:
    """Turn torch's errors for models that forward-mode AD or torch.func cannot differentiate
    (activation checkpointing, custom autograd.Functions, random draws such as active dropout
    under vmap) into a ValueError that says what to do; other errors pass unchanged."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as e:
        if "called random operation while in randomness error mode" in str(e):
            raise ValueError(
                f"{what}: the model draws random numbers in its forward (dropout in training "
                "mode, most often), so its Jacobian is that of another random sub-network for "
                "each vector; call model.eval() first, or set the dropout probability to 0"
            ) from e
        if isinstance(e, torch.OutOfMemoryError) or not any(m in str(e) for m in _UNSUPPORTED):
            raise
        raise ValueError(
            f"{what} needs forward-mode AD or torch.func through the whole model, which this "
            "model does not support (torch: "
            + str(e).split("\n")[0]
            + "). Activation checkpointing (torch.utils.checkpoint) is the usual cause: switch "
            "it off for the Fisher, or use structure='dense', 'block_diag', 'diag' or 'kfac' "
            "with use_reentrant=False, whose layer rules do not need these transforms"
        ) from e


def output_fn(model: nn.Module, x: Any, likelihood: Likelihood):
    """theta (name -> tensor) -> f(theta; x) of shape (N, C)."""

    def f(p: dict[str, Tensor]) -> Tensor:
        return likelihood.check_output(_call(model, p, x))

    return f


def jvp_columns(f, params: dict[str, Tensor], tangents: dict[str, Tensor]) -> Tensor:
    """J t for each of M tangents (name -> (M, *shape)) -> (M, N, C); the primal is not batched,
    so vmap runs one forward with M tangents."""

    def one(t: dict[str, Tensor]) -> Tensor:
        return jvp(f, (params,), (t,))[1]

    with transform_errors("a Jacobian-vector product"):
        return vmap(one)(tangents)


def vjp_columns(f, params: dict[str, Tensor], cotangents: Tensor) -> dict[str, Tensor]:
    """J^T u for each of M cotangents (M, N, C) -> name -> (M, *shape), one forward."""
    with transform_errors("a vector-Jacobian product"):
        pullback = vjp(f, params)[1]
        return vmap(pullback)(cotangents)[0]


__all__ = ["FunctionalModel", "batch_size", "jvp_columns", "output_fn", "vjp_columns"]
