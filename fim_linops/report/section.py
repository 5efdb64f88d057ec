"""A report section (markdown, the figures it references, its numbers) and figure saving."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Section:
    """One section of the demo report.

    Attributes:
        title: the ``##`` heading.
        body: markdown below the heading (tables, prose); image links included.
        images: file names, relative to the report folder, of the figures ``body`` references.
        results: the section's numbers, written to ``results.json`` under the section's key.
    """

    title: str
    body: str
    images: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        """``## title``, a blank line, the body."""
        return f"## {self.title}\n\n{self.body.rstrip()}\n"


def figure_axes(width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    """A new matplotlib (figure, axes) on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_figure(fig: Any, out: Path, name: str) -> str:
    """Save ``fig`` as ``out / name`` (png, 100 dpi), close it, and return ``name`` for a link."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def all_finite(obj: Any) -> bool:
    """Whether every float in a nest of dicts, lists and tuples is finite."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(all_finite(v) for v in obj)
    return True
