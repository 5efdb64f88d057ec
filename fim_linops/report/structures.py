"""Report section: the Fisher at each structure (build time, trace, error, top eigenvalues)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.fisher import fisher
from fim_linops.metrics import trace
from fim_linops.operators.base import EigenOperator
from fim_linops.report.section import Section, figure_axes, save_figure
from fim_linops.report.task import DigitsTask
from fim_linops.spectral import lanczos

STRUCTURES = ("implicit", "diag", "kfac")


def top_eigenvalues(op: LinearOperator, k: int) -> Tensor:
    """Top-k eigenvalues, descending: closed form where the structure has one, Lanczos otherwise."""
    if isinstance(op, EigenOperator):
        return torch.sort(op.eigvalsh(), descending=True).values[:k]
    evals, _ = lanczos(op, k, which="LA")
    return torch.sort(evals, descending=True).values


def structures_section(
    task: DigitsTask, out: Path, n_probes: int = 8, k: int = 5, progress: bool = False
) -> tuple[Section, dict[str, LinearOperator]]:
    """Build the Fisher as implicit (exact), diag and kfac operators and measure each.

    Per structure: build time (s), trace, the relative error ||F_S Z - F Z||_F / ||F Z||_F on
    ``n_probes`` Gaussian probes Z (P, n_probes) against the implicit (exact) F, and the top-``k``
    eigenvalues. Returns the section (with a figure of the top eigenvalues) and the operators.
    """
    rows: list[dict[str, Any]] = []
    ops: dict[str, LinearOperator] = {}
    for structure in STRUCTURES:
        t0 = time.perf_counter()
        ops[structure] = fisher(task.model, task.batches, structure=structure, progress=progress)
        rows.append(
            {
                "structure": structure,
                "build_s": time.perf_counter() - t0,
                "trace": float(trace(ops[structure])),
            }
        )
    gen = torch.Generator().manual_seed(task.seed)
    probes = torch.randn(ops["implicit"].shape[-1], n_probes, generator=gen)
    exact = ops["implicit"] @ probes  # (P, n_probes)
    for row in rows:
        op = ops[row["structure"]]
        approx = op @ probes
        row["rel_error"] = float(torch.linalg.norm(approx - exact) / torch.linalg.norm(exact))
        row["top_eigenvalues"] = [float(v) for v in top_eigenvalues(op, k)]
    lines = [
        f"| structure | build (s) | trace | rel. error vs exact | top-{k} eigenvalues |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        eig = ", ".join(f"{v:.4g}" for v in r["top_eigenvalues"])
        lines.append(
            f"| {r['structure']} | {r['build_s']:.3f} | {r['trace']:.4g} | "
            f"{r['rel_error']:.3g} | {eig} |"
        )
    image = _plot_top(rows, out)
    body = "\n".join(
        [
            f"Fisher of the categorical likelihood (exact type) on {task.n_examples} examples, "
            f"P = {task.n_params} parameters. The error is measured on {n_probes} Gaussian "
            "probes against the implicit operator, which is exact.",
            "",
            *lines,
            "",
            f"![top eigenvalues]({image})",
        ]
    )
    return Section("Fisher at each structure", body, [image], {"rows": rows}), ops


def _plot_top(rows: list[dict[str, Any]], out: Path) -> str:
    fig, ax = figure_axes()
    for r in rows:
        ranks = range(1, len(r["top_eigenvalues"]) + 1)
        ax.semilogy(ranks, r["top_eigenvalues"], "o-", label=r["structure"])
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Top eigenvalues of the Fisher")
    ax.legend()
    return save_figure(fig, out, "top_eigenvalues.png")
