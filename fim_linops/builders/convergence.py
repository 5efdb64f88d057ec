"""Stopping at the precision floor of an iterative eigen/singular solver.

Residuals computed from float32 products of a large operator stop falling at about 1e-5 of the
largest eigen/singular value, however long the iteration runs. :class:`Stagnation` notices that:
once the worst relative residual is within ``floor_factor`` x tol, a window of ``patience`` steps
in which it did not fall by 10% ends the iteration. Above that, slow convergence is real progress
and the solver keeps going (to its own iteration limit and warning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Stagnation:
    """Tracks the smallest worst-residual seen and the steps since it last fell by 10%."""

    tol: float
    patience: int
    floor_factor: float = 100.0
    best: float = math.inf
    since_best: int = 0

    def stalled(self, worst: float, steps: int = 1) -> bool:
        """Record this step's worst relative residual (``steps``: what the step cost, e.g. product
        columns); True when the iteration should stop at the precision floor."""
        if worst < 0.9 * self.best:
            self.best, self.since_best = worst, 0
        else:
            self.since_best += steps
        return self.since_best >= self.patience and self.best <= self.floor_factor * self.tol
