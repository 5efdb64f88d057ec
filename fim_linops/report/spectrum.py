"""Report section: the spectral density of the exact Fisher against KFAC's (stochastic Lanczos
quadrature)."""

from __future__ import annotations

import time
from pathlib import Path

from linear_operator.operators import LinearOperator

from fim_linops.report.section import Section, figure_axes, save_figure
from fim_linops.spectral import density


def spectrum_section(
    exact: LinearOperator, kfac: LinearOperator, out: Path, n_probes: int, n_steps: int, seed: int
) -> Section:
    r"""SLQ densities phi(lambda) of the implicit (exact) Fisher and of KFAC, overlaid.

    Each density is ``fl.spectral.density(op, n_probes, n_steps, log=True)``: ``n_probes``
    Rademacher probes, ``n_steps`` Lanczos steps each (one batched product ``op @ V``, V (P,
    n_probes), per step), Gaussian smoothing in log(eigenvalue). The implicit operator pays
    ``n_steps`` exact Fisher products (forward + backward passes over the data); KFAC pays
    Kronecker products.
    """
    densities = {}
    results: dict[str, dict[str, float]] = {}
    for label, op in (("exact (implicit)", exact), ("KFAC", kfac)):
        t0 = time.perf_counter()
        d = density(op, n_probes=n_probes, n_steps=n_steps, seed=seed, log=True)
        densities[label] = d
        results[label] = {
            "seconds": time.perf_counter() - t0,
            "lambda_min": float(d.lambda_min),
            "lambda_max": float(d.lambda_max),
        }
    fig, ax = figure_axes()
    for label, d in densities.items():
        d.plot(ax=ax, log=True, label=label)
    ax.set_title(f"Fisher spectral density (SLQ, {n_probes} probes x {n_steps} steps)")
    ax.legend()
    image = save_figure(fig, out, "spectrum.png")
    lines = [
        "| operator | SLQ time (s) | smallest Ritz value | largest Ritz value |",
        "|---|---:|---:|---:|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['seconds']:.2f} | {r['lambda_min']:.3g} | {r['lambda_max']:.4g} |"
        )
    body = "\n".join(
        [
            "Stochastic Lanczos quadrature (`fl.spectral.density`, smoothed in log eigenvalue) "
            f"with {n_probes} probes and {n_steps} Lanczos steps on each operator. The implicit "
            "operator computes exact Fisher products without storing the matrix.",
            "",
            *lines,
            "",
            f"![spectral density]({image})",
        ]
    )
    return Section("Spectrum", body, [image], results)
