"""Report section: the approximation comparison of ``fl.compare`` (error, overlap, cost)."""

from __future__ import annotations

from pathlib import Path

from fim_linops.compare import compare
from fim_linops.report.section import Section, figure_axes, save_figure
from fim_linops.report.task import DigitsTask

STRUCTURES = ("diag", "kfac", "ekfac")


def comparison_section(task: DigitsTask, out: Path, n_probes: int, top_k: int = 5) -> Section:
    """``fl.compare`` of diag, kfac and ekfac against the exact Fisher of the task's data.

    For P above ``compare``'s dense limit the relative Frobenius error is a Hutchinson estimate on
    ``n_probes`` Rademacher probes (with its standard error) and the exact top-``top_k``
    eigenvectors come from Lanczos on the implicit operator; see :func:`fim_linops.compare`.
    """
    comp = compare(
        task.model,
        task.batches,
        structures=STRUCTURES,
        n_probes=n_probes,
        top_k=top_k,
        seed=task.seed,
    )
    fig, ax = figure_axes(5.0, 4.0)
    comp.plot(ax=ax)
    image = save_figure(fig, out, "comparison.png")
    body = "\n".join(
        [
            f"`fl.compare` on the same {task.n_examples} examples (P = {comp.n_params}; "
            f"reference: {comp.reference}). Overlap: ||U^T U_S||_F^2 / k of the top-{top_k} "
            "eigenvectors (1 = same subspace).",
            "",
            comp.table(),
            "",
            f"![approximation comparison]({image})",
        ]
    )
    return Section("Approximation comparison", body, [image], {"rows": comp.rows})
