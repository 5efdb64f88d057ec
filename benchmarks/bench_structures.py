r"""EKFAC and low-rank Fisher against NNGeometry and curvlinops, on digits (run from the repo root):

    python benchmarks/bench_structures.py

Data: sklearn's ``load_digits``, the first 1024 examples, batches of 256, float32, on CPU with
``torch.set_num_threads(2)``. Models: an MLP 64-256-256-10 and a CNN with two 3x3 convolutions.
Exact Fisher (= GGN) of the categorical likelihood, mean over examples.

Tasks (each time the median of repeats after a warm-up, divided by the *floor*: one plain
forward + backward of the summed cross-entropy over the same batches):

* EKFAC build: ours ``fl.fisher(structure="ekfac")``; NNGeometry
  ``FIM(model, loader, PMatEKFAC, variant="classif_logits")`` then ``update_diag(loader)`` (the
  eigenvalue refit); curvlinops ``EKFACLinearOperator(fisher_type="type-2")`` with
  ``compute_kronecker_factors()`` and ``compute_eigenvalue_correction()`` called explicitly and
  ``separate_weight_and_bias=False`` (one Kronecker block over [W | b] per layer, the definition
  ours and NNGeometry use; curvlinops' default drops the weight-bias cross terms);
* EKFAC damped solve (F + lambda I)^-1 b, lambda = 1e-3: ours ``F.add_diagonal(lambda).solve(b)``;
  NNGeometry ``solve(b, regul=lambda)``; curvlinops ``KFACInverseLinearOperator(F, lambda,
  use_exact_damping=True) @ b`` (inverse built inside the timed region);
* low-rank top-10: ours ``fl.fisher(structure="lowrank", rank=10)`` (Lanczos on exact
  implicit products, residual tol 1e-5 lambda_max in float32) vs
  ``scipy.sparse.linalg.eigsh(GGNLinearOperator(...).to_scipy(), k=10, tol=1e-5)``; and, as a
  like-for-like product check, the same ``eigsh`` on ours: ``fl.to_scipy(fl.fisher(structure=
  "implicit"))``.

Agreement: EKFAC products F v of the three libraries relative to ours; top-10 eigenvalues of each
low-rank route relative to eigsh on curvlinops (max over the 10 of |lambda_i - lambda_i^ref| /
lambda_i^ref).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=FutureWarning)

import fim_linops as fl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import cnn, digits_batches, mlp  # noqa: E402

N, BATCH, DAMPING, K = 1024, 256, 1e-3, 10


# -- data and models: the same as bench_fisher.py's (benchmarks/models.py) ------------------------
def digits(image: bool) -> DataLoader:
    return digits_batches(image, N, BATCH)


# -- timing ----------------------------------------------------------------------------------------
def median_time(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, budget_s: float = 4.0
) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over up to ``repeats`` runs after ``warmup`` runs (fewer
    repeats when the warm-up shows that they would exceed ``budget_s``); and its result."""
    out = None
    t0 = time.perf_counter()
    for _ in range(warmup):
        out = fn()
    if warmup:
        per_run = (time.perf_counter() - t0) / warmup
        repeats = max(1, min(repeats, int(budget_s / max(per_run, 1e-9))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def floor(model: nn.Module, batches: DataLoader) -> Callable[[], None]:
    """One plain forward + backward of the summed cross-entropy over the batches."""

    def run() -> None:
        for x, y in batches:
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    return run


def rel(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """||a - b|| / ||b||."""
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# -- peers -----------------------------------------------------------------------------------------
def nngeometry_ekfac(model: nn.Module, batches: DataLoader) -> Any:
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatEKFAC

    F = FIM(model, batches, PMatEKFAC, variant="classif_logits")
    F.update_diag(batches)
    return F


def nngeometry_apply(F: Any, model: nn.Module, v: Tensor, solve: bool) -> Tensor:
    from nngeometry.object.vector import PVector

    pv = PVector(F.generator.layer_collection, vector_repr=v)
    out = F.solve(pv, regul=DAMPING) if solve else F.mv(pv)
    return out.to_torch()


def curvlinops_ekfac(model: nn.Module, batches: DataLoader) -> Any:
    from curvlinops import EKFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    F = EKFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        params,
        batches,
        fisher_type="type-2",
        check_deterministic=False,
        num_data=N,
        separate_weight_and_bias=False,  # one Kronecker block over [W | b], as ours and NNGeometry
    )
    F.compute_kronecker_factors()
    F.compute_eigenvalue_correction()
    return F


def curvlinops_solve(F: Any, v: Tensor) -> Tensor:
    from curvlinops import KFACInverseLinearOperator

    inv = KFACInverseLinearOperator(F, damping=DAMPING, use_exact_damping=True)
    return inv @ v


def curvlinops_topk(model: nn.Module, batches: DataLoader) -> np.ndarray:
    from curvlinops import GGNLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    G = GGNLinearOperator(
        model, nn.CrossEntropyLoss(), params, batches, check_deterministic=False, num_data=N
    )
    return np.sort(eigsh(G.to_scipy(), k=K, tol=1e-5, return_eigenvectors=False))


def ours_eigsh_topk(model: nn.Module, batches: DataLoader) -> np.ndarray:
    F = fl.fisher(model, batches, structure="implicit")
    op = fl.to_scipy(F, dtype=np.float32)
    return np.sort(eigsh(op, k=K, tol=1e-5, return_eigenvectors=False))


# -- benchmark -------------------------------------------------------------------------------------
def bench(name: str, model: nn.Module, batches: DataLoader, repeats: int) -> list[dict[str, Any]]:
    p = sum(q.numel() for q in model.parameters())
    t_floor, _ = median_time(floor(model, batches), repeats=max(repeats, 5), warmup=2)
    v = torch.randn(p, generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, Any]] = []

    def add(task: str, lib: str, t: float, agree: str = "") -> None:
        rows.append(
            {
                "model": f"{name} (P={p})",
                "task": task,
                "library": lib,
                "time_s": t,
                "over_floor": t / t_floor,
                "agreement": agree,
            }
        )

    add("floor: forward + backward", "torch", t_floor)

    # EKFAC build
    t_ours, F = median_time(lambda: fl.fisher(model, batches, structure="ekfac"), repeats)
    t_nng, Fn = median_time(lambda: nngeometry_ekfac(model, batches), repeats)
    t_cl, Fc = median_time(lambda: curvlinops_ekfac(model, batches), repeats)
    with torch.no_grad():
        mv = F @ v
        mv_n, mv_c = nngeometry_apply(Fn, model, v, solve=False), Fc @ v
    add("EKFAC build", "fim_linops", t_ours)
    add("EKFAC build", "nngeometry", t_nng, f"Fv rel. diff {rel(mv_n, mv):.1e}")
    add("EKFAC build", "curvlinops", t_cl, f"Fv rel. diff {rel(mv_c, mv):.1e}")

    # EKFAC damped solve
    Fd = F.add_diagonal(DAMPING)
    t_ours, x = median_time(lambda: Fd.solve(v), 5 * repeats)
    t_nng, xn = median_time(lambda: nngeometry_apply(Fn, model, v, solve=True), 5 * repeats)
    t_cl, xc = median_time(lambda: curvlinops_solve(Fc, v), 5 * repeats)
    add("EKFAC damped solve", "fim_linops", t_ours)
    add("EKFAC damped solve", "nngeometry", t_nng, f"x rel. diff {rel(xn, x):.1e}")
    add("EKFAC damped solve", "curvlinops", t_cl, f"x rel. diff {rel(xc, x):.1e}")

    # low-rank top-k
    # (tens of seconds each: one timed run, the process already warm from the tasks above)
    t_cl, ev_c = median_time(lambda: curvlinops_topk(model, batches), 1, warmup=0)
    t_ours, L = median_time(
        lambda: fl.fisher(model, batches, structure="lowrank", rank=K), 1, warmup=0
    )
    t_oe, ev_oe = median_time(lambda: ours_eigsh_topk(model, batches), 1, warmup=0)
    ev_ours = torch.sort(L.evals).values.double().numpy()

    def agree(ev: np.ndarray) -> str:
        return f"top-{K} eigval max rel. diff {float(np.max(np.abs(ev - ev_c) / ev_c)):.1e}"

    add(f"top-{K} eigenpairs", "fim_linops lowrank", t_ours, agree(ev_ours))
    add(f"top-{K} eigenpairs", "eigsh on fim_linops implicit", t_oe, agree(ev_oe))
    add(
        f"top-{K} eigenpairs",
        "eigsh on curvlinops GGN",
        t_cl,
        f"reference (lambda_max {ev_c[-1]:.3g})",
    )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows."""
    lines = [
        "| model | task | library | median time | / floor | agreement |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        t = r["time_s"]
        ts = f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"
        lines.append(
            f"| {r['model']} | {r['task']} | {r['library']} | {ts} | {r['over_floor']:.2f} | "
            f"{r['agreement']} |"
        )
    return "\n".join(lines)


def main(repeats: int = 5) -> None:
    torch.set_num_threads(2)
    rows = []
    rows += bench("MLP 64-256-256-10", mlp(), digits(image=False), repeats)
    rows += bench("CNN 2 conv", cnn(), digits(image=True), repeats)
    print(
        f"digits, N={N}, batch {BATCH}, float32, CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
