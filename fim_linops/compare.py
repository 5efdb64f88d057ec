r"""compare(): pick an approximation of the Fisher by measuring it against the exact one.

For each structure S the Fisher is built once with ``fl.fisher(structure=S)`` and measured:

* ``build_s``: wall time of that build (one timed run; the device is synchronised);
* ``stored_bytes``: bytes of the tensors the operator holds (shared storage counted once);
* ``peak_bytes``: peak memory of the build above what was in use before it
  (``torch.cuda.max_memory_allocated`` on GPU; on CPU the resident-set high-water mark, reset
  through ``/proc/self/clear_refs`` on Linux, else ``tracemalloc``'s peak);
* ``rel_error``: ||F_S - F||_F / ||F||_F against the exact Fisher F of the same ``fisher_type``.
  Small P (``P <= exact_max_params``): both densified, the error is exact. Large P: Hutchinson on
  E = F_S - F with a seeded Rademacher block Z (P, n):

      E_z ||E z||^2 = tr(E^T E) = ||E||_F^2,   estimate  (1/n) sum_j ||E z_j||^2,

  from one batched product per operator (F Z comes from the implicit operator once and is shared
  by all structures), and ||F||_F exact from ``fl.frobenius_norm``. ``rel_error_se`` is the
  standard error of the estimate (propagated to the norm), 0 on the exact path;
* ``overlap``: ||U^T U_S||_F^2 / k in [0, 1], U (P, k) the top-k eigenvectors of F and U_S those of
  F_S; 1 when the two top-k subspaces coincide. U from ``torch.linalg.eigh`` (small P) or Lanczos
  on the implicit operator; U_S from the structure's closed-form ``eigh`` (Kronecker, block,
  diagonal, low-rank), else from a dense ``eigh`` (small P) or Lanczos.
"""

from __future__ import annotations

import csv
import os
import time
import tracemalloc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from fim_linops.fisher import fisher
from fim_linops.metrics import frobenius_norm
from fim_linops.operators.base import EigenOperator, FisherOperator
from fim_linops.operators.mixed import Mixed

__all__ = ["Comparison", "compare", "operator_bytes"]

#: columns of Comparison.rows, in table order
COLUMNS = (
    "structure",
    "build_s",
    "stored_bytes",
    "peak_bytes",
    "rel_error",
    "rel_error_se",
    "error_method",
    "overlap",
)


# -- memory ---------------------------------------------------------------------------------------
def operator_bytes(op: Any) -> int:
    """Bytes of the tensors an operator holds (constructor tensors, nested operators, lists and
    dicts of tensors), each storage counted once. Modules held by implicit operators are not
    walked: their parameters are snapshotted as constructor tensors."""
    seen: set[tuple[int, str]] = set()
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), str(obj.device))
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, LinearOperator):
            for a in obj._args:
                walk(a)
            for v in obj._kwargs.values():
                walk(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)

    walk(op)
    return total


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} not in /proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        _rss_bytes("VmHWM")
        return True
    except OSError:
        return False


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Peak bytes allocated inside the block above those in use when it began: ``out["peak"]``."""
    out = {"peak": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - base
        return
    if _reset_rss_peak():
        base = _rss_bytes("VmRSS")
        yield out
        out["peak"] = max(_rss_bytes("VmHWM") - base, 0)
        return
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield out
        out["peak"] = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- spectra --------------------------------------------------------------------------------------
def _top_k_closed_form(op: LinearOperator, k: int) -> Tensor | None:
    """U_S (P, k) from a structural eigendecomposition, or None when the structure has none."""
    if not isinstance(op, EigenOperator | Mixed):
        return None
    try:
        evals, evecs = op.eigh()
    except (NotImplementedError, TypeError, AttributeError):
        return None
    idx = torch.topk(evals, k).indices
    pick = torch.zeros(evals.shape[0], k, dtype=op.dtype, device=op.device)
    pick[idx, torch.arange(k, device=op.device)] = 1
    return evecs @ pick


def _top_k(op: LinearOperator, k: int, dense: Tensor | None, seed: int) -> Tensor:
    """Top-k eigenvectors (P, k): closed form, else dense eigh when given, else Lanczos."""
    u = _top_k_closed_form(op, k)
    if u is not None:
        return u
    if dense is not None:
        return torch.linalg.eigh(dense)[1][:, -k:]
    from fim_linops.spectral import lanczos

    return lanczos(op, k, which="LA", seed=seed)[1]


def subspace_overlap(u: Tensor, v: Tensor) -> float:
    r"""||U^T V||_F^2 / k for orthonormal U, V (P, k): the mean squared cosine of the principal
    angles between the two k-dimensional subspaces (1: equal, 0: orthogonal)."""
    return float((u.mT @ v).square().sum() / u.shape[1])


# -- result ---------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Measurements of several Fisher approximations on one model and data set.

    ``rows``: one dict per structure with the keys in ``COLUMNS`` (see the module docstring);
    ``n_params``: P; ``top_k``: k of the overlap; ``reference``: how the exact F was handled.
    """

    rows: list[dict[str, Any]]
    n_params: int
    top_k: int
    reference: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The rows as a markdown table."""
        head = (
            "| structure | build (s) | stored | peak | rel. Frobenius error | "
            f"top-{self.top_k} overlap |"
        )
        lines = [head, "|---|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            err = f"{r['rel_error']:.3e}"
            if r["error_method"] == "hutchinson":
                err += f" ± {r['rel_error_se']:.1e}"
            lines.append(
                f"| {r['structure']} | {r['build_s']:.3g} | {_fmt_bytes(r['stored_bytes'])} | "
                f"{_fmt_bytes(r['peak_bytes'])} | {err} | {r['overlap']:.3f} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"P = {self.n_params}, reference: {self.reference}\n\n{self.table()}"

    def plot(self, ax: Any = None) -> Any:
        """Relative Frobenius error against build time, one labelled point per structure.
        Returns the matplotlib Axes."""
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(5, 4))
        for r in self.rows:
            ax.scatter(r["build_s"], r["rel_error"])
            ax.annotate(
                r["structure"],
                (r["build_s"], r["rel_error"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        ax.set_xscale("log")
        if all(r["rel_error"] > 0 for r in self.rows):
            ax.set_yscale("log")
        ax.set_xlabel("build time (s)")
        ax.set_ylabel(r"$\|F_S - F\|_F \,/\, \|F\|_F$")
        ax.set_title(f"Fisher approximations (P = {self.n_params})")
        ax.grid(True, alpha=0.3)
        return ax

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the rows to a CSV file with a header line."""
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            for r in self.rows:
                writer.writerow({c: r[c] for c in COLUMNS})


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _label(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        parts = []
        for key, val in spec.items():
            name = (
                key.__name__
                if isinstance(key, type)
                else key
                if isinstance(key, str)
                else type(key).__name__
            )
            parts.append(f"{name}:{val}")
        return "mix(" + ", ".join(parts) + ")"
    return str(getattr(spec, "value", spec))


# -- compare --------------------------------------------------------------------------------------
def compare(
    model: nn.Module,
    data: Any,
    structures: Sequence[Any] | Mapping[str, Any] = ("diag", "kfac", "ekfac"),
    likelihood: Any = "categorical",
    rank: int | None = None,
    n_probes: int = 100,
    top_k: int = 5,
    method: str = "auto",
    exact_max_params: int = 3000,
    seed: int = 0,
    **fisher_kwargs: Any,
) -> Comparison:
    r"""Build each Fisher approximation and measure it against the exact Fisher.

    Args:
        model: as for :func:`fim_linops.fisher`.
        data: as for :func:`fim_linops.fisher`.
        likelihood: as for :func:`fim_linops.fisher`.
        structures: structure names (``"diag"``, ``"kfac"``, ``"lowrank"``, ...) or per-layer
            mixes (dicts); or a mapping ``{label: structure}`` to name them in the table.
        rank: ``rank=`` for the structures that need one (lowrank, kron_sum); default
            ``max(top_k, 10)`` for lowrank and 1 for kron_sum.
        n_probes: Rademacher probes of the Hutchinson error estimate (large P).
        top_k: k of the top-eigenvector overlap.
        method: ``"auto"`` (dense if P <= ``exact_max_params``, else Hutchinson), ``"dense"``
            or ``"hutchinson"``.
        seed: seed of the probes and of the Lanczos start vectors.
        **fisher_kwargs: passed to every :func:`fim_linops.fisher` call (``fisher_type``,
            ``params``, ``device``, ``dtype``, ...), the exact reference's included.

    Returns:
        A :class:`Comparison` (``.rows``, ``.table()``, ``.plot()``, ``.to_csv()``).
    """
    if method not in ("auto", "dense", "hutchinson"):
        raise ValueError(f"method must be 'auto', 'dense' or 'hutchinson', got {method!r}")
    if n_probes < 1 or top_k < 1:
        raise ValueError(f"n_probes and top_k must be >= 1, got {n_probes} and {top_k}")
    specs = (
        dict(structures) if isinstance(structures, Mapping) else {_label(s): s for s in structures}
    )
    if not specs:
        raise ValueError("compare: no structures given")

    def build(spec: Any) -> FisherOperator:
        kwargs = dict(fisher_kwargs)
        name = spec if isinstance(spec, str) else None
        if name == "lowrank":
            kwargs["rank"] = rank if rank is not None else max(top_k, 10)
        elif name == "kron_sum":
            kwargs["rank"] = rank if rank is not None else 1
        elif isinstance(spec, dict) and rank is not None:
            kwargs["rank"] = rank
        return fisher(model, data, likelihood=likelihood, structure=spec, **kwargs)

    exact = build("implicit")
    p, dev, dt = exact.shape[-1], exact.device, exact.dtype
    if top_k > p:
        raise ValueError(f"top_k={top_k} exceeds the number of parameters P={p}")
    use_dense = method == "dense" or (method == "auto" and p <= exact_max_params)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        if use_dense:
            f_dense = exact.to_dense()
            f_norm = torch.linalg.matrix_norm(f_dense)
            u_exact = torch.linalg.eigh(f_dense)[1][:, -top_k:]
            reference = "dense (exact errors)"
        else:
            from fim_linops.spectral import lanczos

            f_dense = None
            f_norm = frobenius_norm(exact)
            u_exact = lanczos(exact, top_k, which="LA", seed=seed)[1]
            bits = torch.randint(0, 2, (p, n_probes), generator=gen, device=dev, dtype=dt)
            z = 2 * bits - 1
            fz = exact @ z
            reference = f"implicit (Hutchinson, {n_probes} probes)"

    rows = []
    for label, spec in specs.items():
        _sync(dev)
        with peak_memory(dev) as mem:
            t0 = time.perf_counter()
            op = build(spec)
            _sync(dev)
            build_s = time.perf_counter() - t0
        stored = operator_bytes(op)
        with torch.no_grad():
            if use_dense:
                approx = op.to_dense()
                err = float(torch.linalg.matrix_norm(approx - f_dense) / f_norm)
                se = 0.0
            else:
                approx = None
                sq = (op @ z - fz).square().sum(0)  # ||E z_j||^2, (n,)
                mean = sq.mean()
                err = float(mean.sqrt() / f_norm)
                # delta method: se(sqrt(m)) = se(m) / (2 sqrt(m))
                sd = sq.std() if n_probes > 1 else torch.zeros((), dtype=dt, device=dev)
                se = float(sd / n_probes**0.5 / (2 * mean.sqrt().clamp_min(1e-300)) / f_norm)
            u_approx = _top_k(op, top_k, approx, seed)
        rows.append(
            {
                "structure": label,
                "build_s": build_s,
                "stored_bytes": stored,
                "peak_bytes": mem["peak"],
                "rel_error": err,
                "rel_error_se": se,
                "error_method": "dense" if use_dense else "hutchinson",
                "overlap": subspace_overlap(u_exact, u_approx.to(dt)),
            }
        )
        del op, approx
    return Comparison(rows, n_params=p, top_k=top_k, reference=reference)
