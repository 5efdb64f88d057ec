r"""The plain module behind an FSDP2- or DDP-wrapped model, for the duration of a build.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter as a ``DTensor`` shard
(dim 0 split over the ranks) and all-gathers it in a forward pre-hook, frees it again in a
forward post-hook, and reduce-scatters ``.grad`` in backward hooks. None of that suits the
engine: its ``torch.func`` path swaps parameters by ``functional_call`` (the pre-hook would swap
them back), its backward goes to the layer *outputs* with ``is_grads_batched`` (no parameter
gradient to reduce-scatter), and the layout needs full parameter shapes. So, for the build:

1. every ``FSDPModule`` in the model is unsharded (``FSDPModule.unshard()``: one all-gather per
   parameter group, every rank in the same order), which registers plain full
   ``nn.Parameter`` s on the modules, in the same ``named_parameters()`` order;
2. FSDP's forward pre/post hooks are lifted out of the modules' hook dicts (the dicts are
   restored item for item on exit, so hook order is kept);
3. on exit, the hooks come back and every module that was sharded on entry is resharded.

Each rank then holds the full parameters while the build runs (as FSDP itself does for one
wrapped module during its forward); its own data shard goes through the plain module and the
statistics are reduced over the process group as for data parallelism
(:mod:`fim_linops.distributed`). ``DistributedDataParallel`` is unwrapped to its ``.module``
(same parameters, same order; names lose the ``module.`` prefix).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., Any])

#: ids of the models inside a :func:`gathered` block (nested calls do nothing)
_ACTIVE: set[int] = set()

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _fsdp_modules(model: nn.Module) -> list[Any]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unwrap(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(m)`` -> ``m`` (also nested); any other model as it is."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def plain_type(module: nn.Module) -> type:
    """The module's own class: ``fully_shard`` swaps ``nn.Linear`` for a generated
    ``FSDPLinear(FSDPModule, nn.Linear)``; the layer rules and per-layer mixes key on
    ``nn.Linear``."""
    cls = type(module)
    bases = cls.__bases__
    if (
        len(bases) == 2
        and bases[0].__name__ == "FSDPModule"
        and cls.__name__ == "FSDP" + (bases[1].__name__)
    ):
        return bases[1]
    return cls


def is_sharded(model: nn.Module) -> bool:
    """Whether the model is wrapped in DistributedDataParallel or holds FSDP2 modules that are
    not already gathered (inside :func:`gathered`)."""
    if not isinstance(model, nn.Module):  # the build's own checks name what is wrong
        return False
    if unwrap(model) is not model:
        return True
    return id(model) not in _ACTIVE and bool(_fsdp_modules(model))


def _handle_ids(state: Any) -> list[int]:
    """The hook ids of FSDP's forward hooks on one FSDP state (a RemovableHandle, or the
    _MultiHandle of a group of modules sharded together)."""
    ids: list[int] = []
    for name in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
        handle = getattr(state, name, None)
        for h in getattr(handle, "handles", (handle,)):
            if h is not None and hasattr(h, "id"):
                ids.append(h.id)
    return ids


def _was_sharded(module: Any) -> bool:
    groups = module._get_fsdp_state()._fsdp_param_groups
    return any(not g.is_unsharded for g in groups)


@contextmanager
def _lifted_hooks(modules: list[Any]) -> Iterator[None]:
    """Remove FSDP's forward hooks from every module, put them back (same order) on exit."""
    saved: list[tuple[dict, list]] = []
    ids: set[int] = set()
    for m in modules:
        ids.update(_handle_ids(m._get_fsdp_state()))
    for m in modules:
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if d and any(k in ids for k in d):
                saved.append((d, list(d.items())))
                for k in [k for k in d if k in ids]:
                    del d[k]
    try:
        yield
    finally:
        for d, items in saved:
            d.clear()
            d.update(items)


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """The plain module to run: DDP unwrapped, FSDP2 parameters all-gathered and FSDP's forward
    hooks lifted for the block; the model is resharded as found on exit (also on errors).
    A collective: every rank of the FSDP mesh must enter it (as for a forward)."""
    model = unwrap(model)
    modules = _fsdp_modules(model)
    if not modules or id(model) in _ACTIVE:
        yield model
        return
    sharded = [m for m in modules if _was_sharded(m)]
    with ExitStack() as stack:
        _ACTIVE.add(id(model))
        stack.callback(_ACTIVE.discard, id(model))
        for m in sharded:
            stack.callback(m.reshard)
        for m in modules:
            m.unshard()
        stack.enter_context(_lifted_hooks(modules))
        yield model


def on_gathered_model(method: F) -> F:
    """Run an operator method that calls ``self.model`` inside :func:`gathered` (operators that
    hold the model, such as ``Implicit``, are used after the build, when FSDP has resharded)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with gathered(self.model):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def on_plain_model(build: F) -> F:
    """Run an entry point whose first argument is the model (``fisher``, ``fisher_one_pass``) on
    the gathered plain module when the model is FSDP2-sharded or DDP-wrapped (every other
    argument passed on as it came), else as it is."""

    @functools.wraps(build)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_sharded(model):
            return build(model, *args, **kwargs)
        with gathered(model) as plain:
            return build(plain, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
