r"""The torch.func path: per-example gradients of parameters that have no layer rule, and exact
Jacobian-vector products for implicit operators.

Shapes: N examples, C outputs, K columns, M right-hand sides.

Per-example gradients: for example n and column k, J_n^T V[k, n] = vjp of f(theta; x_n) at V[k, n],
as ``vmap`` over n of (``vjp`` then ``vmap`` over k).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from fim_linops.data import batch_size
from fim_linops.layout import ParamEntry
from fim_linops.likelihoods import Likelihood


def _slice(x: Any, lo: int, hi: int) -> Any:
    return tree_map(lambda t: t[lo:hi] if isinstance(t, Tensor) else t, x)


def _call(model: nn.Module, params: dict[str, Tensor], x: Any) -> Tensor:
    if isinstance(x, dict):
        return functional_call(model, params, (), x)
    if isinstance(x, (tuple, list)):
        return functional_call(model, params, tuple(x))
    return functional_call(model, params, (x,))


class FunctionalModel:
    """The model as a function of a subset of its parameters (``entries``), the others fixed."""

    def __init__(self, model: nn.Module, entries: Sequence[ParamEntry]):
        self.model = model
        self.entries = list(entries)

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
        xs = _slice(x, lo, hi)
        vs = v[:, lo:hi].transpose(0, 1)  # (n, K, C)

        def one(x_n: Any, v_n: Tensor) -> dict[str, Tensor]:
            def f(p: dict[str, Tensor]) -> Tensor:
                x_b = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x_n)
                return likelihood.check_output(_call(self.model, p, x_b))[0]

            pullback = vjp(f, params)[1]
            return vmap(pullback)(v_n)[0]

        out = vmap(one, in_dims=(0, 0), randomness="different")(xs, vs)  # name -> (n, K, *shape)
        return {name: g.transpose(0, 1) for name, g in out.items()}


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

    return vmap(one)(tangents)


def vjp_columns(f, params: dict[str, Tensor], cotangents: Tensor) -> dict[str, Tensor]:
    """J^T u for each of M cotangents (M, N, C) -> name -> (M, *shape), one forward."""
    pullback = vjp(f, params)[1]
    return vmap(pullback)(cotangents)[0]


__all__ = ["FunctionalModel", "batch_size", "jvp_columns", "output_fn", "vjp_columns"]
