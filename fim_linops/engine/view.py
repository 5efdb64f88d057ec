"""A view of an engine restricted to some of its layers, in the local coordinates of their own
layout, so that one engine pass can feed the statistics of several groups of layers.

The engine runs once over the union of the groups' parameters; :meth:`EngineView.result` re-indexes
a :class:`BatchResult` (the calls of the ruled layers, the per-example gradients of the torch.func
layers) to the group, whose layout has its own flat order (the union's order restricted to the
group). The statistics and operators of :mod:`fim_linops.statistics` and the builders then run on
(view, result) unchanged and produce operators over the group's own vector.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fim_linops.engine.engine import BatchResult, Engine
from fim_linops.engine.ruled import RuledBlock
from fim_linops.layout import LayerBlock, ParamLayout


class EngineView(Engine):
    """``engine`` seen through ``layout`` (a layout of a subset of the engine's layers)."""

    def __init__(self, engine: Engine, layout: ParamLayout):  # no Engine.__init__: a view
        self.base = engine
        self.model = engine.model
        self.layout = layout
        self.likelihood = engine.likelihood
        self.fisher_type = engine.fisher_type
        self.mc_samples = engine.mc_samples
        self.generator = engine.generator
        self.max_bytes = engine.max_bytes
        self.rows_free = engine.rows_free
        self.rows_checked = engine.rows_checked
        by_name = {b.module_name: bi for bi, b in enumerate(engine.layout.blocks)}
        self.ruled: list[RuledBlock] = []
        self.fallback: list[LayerBlock] = []
        self.block_kind: dict[int, tuple[str, int]] = {}
        self._from_base: dict[int, int] = {}  # base ruled index -> view ruled index
        for bi, block in enumerate(layout.blocks):
            kind, idx = engine.block_kind[by_name[block.module_name]]
            if kind == "ruled":
                base = engine.ruled[idx]
                self._from_base[idx] = len(self.ruled)
                self.block_kind[bi] = ("ruled", len(self.ruled))
                self.ruled.append(RuledBlock(block, base.module, base.rule))
            else:
                self.block_kind[bi] = ("func", len(self.fallback))
                self.fallback.append(block)

    def result(self, res: BatchResult) -> BatchResult:
        """The batch as this view sees it: the group's calls under the group's indices."""
        calls = {self._from_base[i]: c for i, c in res.calls.items() if i in self._from_base}
        return BatchResult(res.n, res.k, calls, res.x, res.v, self, res.count)

    def functional_grads(self, x: Any, v: Tensor, lo: int, hi: int) -> dict[str, Tensor]:
        """Per-example gradients of the base engine's torch.func parameters (keyed by name; the
        group reads its own)."""
        return self.base.functional_grads(x, v, lo, hi)
