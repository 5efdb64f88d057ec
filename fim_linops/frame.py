r"""The frame every engine build runs in: ``fl.fisher``, the one-pass mix, influence's gradient
pass and ``fisher_sharded`` differ only in the builder they hand to :func:`run_build`.

The frame: the model-dependent checks of the options (:meth:`BuildOptions.layout_of`), the active
dropout warning, the model left exactly as found (:func:`preserved_state`), the working copy on
``options.device`` / ``options.dtype``, then ``prepare(work, layout, dtype)`` (the builder's own
checks, before any data pass; it returns the builder), one :class:`Engine` over the selected
parameters and the builder run on its :class:`BuildContext`. When the first forward finds layers
that must go through torch.func (``UnruledLayers``), the engine is rebuilt with them demoted and
the build starts again (a one-shot iterator gets its first batch back in front).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from fim_linops.builders.base import BuildContext
from fim_linops.distributed import resolve_group
from fim_linops.engine import Engine, prepare_model
from fim_linops.engine.checks import UnruledLayers
from fim_linops.engine.dropout import warn_active_dropout
from fim_linops.engine.engine import HALF
from fim_linops.layout import ParamLayout
from fim_linops.options import BuildOptions
from fim_linops.state import preserved_state

R = TypeVar("R")

#: prepare(work, layout, dtype) -> builder: the working copy of the model, the layout of the
#: selected parameters in it and the dtype of the statistics; run once per build, before the data
Prepare = Callable[[nn.Module, ParamLayout, torch.dtype], Callable[[BuildContext], R]]

#: the user's call -> on_plain_model's wrapper -> entry point -> its build -> run_build -> warn
_DROPOUT_STACKLEVEL = 6


def run_build(model: nn.Module, data: Any, options: BuildOptions, prepare: Prepare[R]) -> R:
    """``prepare``'s builder run on ``data`` over ``options.params`` of ``model`` (see the module
    docstring); returns what the builder returns."""
    layout = options.layout_of(model)
    warn_active_dropout(model, "the Fisher", stacklevel=_DROPOUT_STACKLEVEL)
    with preserved_state(model):
        work, work_layout = prepare_model(model, layout, options.device, options.dtype)
        dev = work_layout.entries[0].param.device
        dt = work_layout.entries[0].param.dtype
        if dt in HALF:  # the half model runs as it is; statistics and operator in float32
            dt = torch.float32
        build = prepare(work, work_layout, dt)
        group = resolve_group(options.process_group)

        def engine_and_context(data: Any) -> tuple[Engine, BuildContext]:
            o = options
            engine = Engine(
                work, work_layout, o.likelihood, o.fisher_type, o.mc_samples, o.generator
            )
            engine.max_bytes = o.max_bytes
            return engine, BuildContext(engine, data, dev, dt, options, group)

        engine, ctx = engine_and_context(data)
        try:
            return build(ctx)
        except UnruledLayers as raw:  # found in the first forward, before any statistic
            if isinstance(data, Iterator):  # one-shot: the batch it already gave comes first
                data = itertools.chain([raw.batch], data)
            engine, ctx = engine_and_context(data)
            engine.demote(raw.reasons)
            return build(ctx)
