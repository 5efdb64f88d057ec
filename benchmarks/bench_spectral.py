"""Spectra of the exact Fisher of the digits CNN: fim_linops against curvlinops, one run.

Tasks (1024 digits, batch 256, float32, 2 threads):
* top-10 eigenvalues by ``scipy.sparse.linalg.eigsh`` (which="LA", tol=1e-3) on
  ``fl.to_scipy(fl.fisher(structure="implicit"))`` and on curvlinops' ``GGNLinearOperator``
  (``.to_scipy()``), both mean-normalised; also our own ``fl.spectral.lanczos``;
* a spectral density by stochastic Lanczos quadrature: ``fl.spectral.density`` (10 probes, 80
  steps, all probes batched in one product per step) against curvlinops'
  ``lanczos_approximate_spectrum`` (ncv=80, num_repeats=10, one probe at a time).

Each time is also given over the floor: one plain forward+backward of the mean cross-entropy over
the same batches. Run: ``python benchmarks/bench_spectral.py``.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

import fim_linops as fl


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    from curvlinops import GGNLinearOperator, lanczos_approximate_spectrum
    from sklearn.datasets import load_digits

    torch.set_num_threads(2)
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:1024], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(y[:1024])
    model = digits_cnn().eval()
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, 1024, 256)]
    params = [p for p in model.parameters() if p.requires_grad]

    def floor() -> None:
        for xb, yb in batches:
            model.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()

    t_floor, _ = timed(floor, 5)
    F = fl.fisher(model, batches, structure="implicit")
    ours = fl.to_scipy(F)
    # curvlinops' GGN of the mean loss over all batches = our mean Fisher (exact type)
    theirs = GGNLinearOperator(
        model, nn.CrossEntropyLoss(), params, batches, check_deterministic=False
    )
    theirs_sp = theirs.to_scipy()
    v0 = np.random.default_rng(0).standard_normal(F.shape[-1])

    rows = []
    t_ours, ev_ours = timed(lambda: eigsh(ours, k=10, which="LA", tol=1e-3, v0=v0)[0], 2)
    t_theirs, ev_theirs = timed(lambda: eigsh(theirs_sp, k=10, which="LA", tol=1e-3, v0=v0)[0], 2)
    print(f"eigsh: ours {t_ours:.2f} s, curvlinops {t_theirs:.2f} s", flush=True)
    t_lanczos, (ev_lanczos, _) = timed(lambda: fl.spectral.lanczos(F, 10, which="LA"), 2)
    print(f"fl.spectral.lanczos: {t_lanczos:.2f} s", flush=True)
    agree = float(np.max(np.abs(np.sort(ev_ours) - np.sort(ev_theirs)) / np.max(np.abs(ev_theirs))))
    rows.append(("top-10 eigsh (scipy on to_scipy)", t_ours, t_theirs, agree))
    agree_l = float(
        np.max(np.abs(np.sort(ev_lanczos.numpy()) - np.sort(ev_theirs)) / np.max(np.abs(ev_theirs)))
    )
    rows.append(("top-10 fl.spectral.lanczos vs curvlinops eigsh", t_lanczos, t_theirs, agree_l))

    t_slq, d = timed(lambda: fl.spectral.density(F, n_probes=10, n_steps=80, seed=0), 1)
    print(f"SLQ ours: {t_slq:.2f} s", flush=True)
    t_slq_theirs, (grid, dens) = timed(
        lambda: lanczos_approximate_spectrum(theirs, ncv=80, num_repeats=10), 1
    )
    # agreement: first moment of the two densities on their grids (both estimate trace / P)
    m_ours = float(d.moment(1))
    g, p = np.asarray(grid), np.asarray(dens)
    m_theirs = float(np.trapezoid(g * p, g) / np.trapezoid(p, g))
    rows.append(
        (
            "SLQ density (10 probes, 80 steps)",
            t_slq,
            t_slq_theirs,
            abs(m_ours - m_theirs) / abs(m_theirs),
        )
    )

    print(f"floor (forward+backward over 1024 examples): {t_floor * 1e3:.1f} ms; P = {F.shape[-1]}")
    print("| task | fim_linops | x floor | curvlinops | x floor | speed-up | rel. difference |")
    print("|---|---|---|---|---|---|---|")
    for name, a, b, diff in rows:
        print(
            f"| {name} | {a:.3f} s | {a / t_floor:.1f} | {b:.3f} s | {b / t_floor:.1f} | "
            f"{b / a:.2f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
