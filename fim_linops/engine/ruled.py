"""A ruled layer: a block of the layout whose per-example statistics come from a layer rule.

Shared by the engine, which makes them (:meth:`fim_linops.engine.engine.Engine._split`), and the
first-batch checks (:mod:`fim_linops.engine.checks`) and builders, which read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fim_linops.engine.rules.base import LayerRule
from fim_linops.layout import LayerBlock


@dataclass
class RuledBlock:
    """``block``'s parameters are those of ``module``, whose calls ``rule`` turns into the
    block's statistics."""

    block: LayerBlock
    module: nn.Module
    rule: LayerRule
