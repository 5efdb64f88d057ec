"""The ``fim-linops`` command.

``fim-linops demo`` trains a small CNN on scikit-learn's digits for a few seconds, builds its
Fisher as diag, kfac and implicit (exact) operators, and prints and writes a report: per
structure the build time, the trace, the top eigenvalues and the relative error against the exact
implicit operator on random probes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fim_linops as fl


def digits_cnn() -> nn.Module:
    """Conv(1->8, 3x3, pad 1) - ReLU - Conv(8->16, 3x3, stride 2, pad 1) - ReLU - Linear(256->10)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits shipped with scikit-learn: x (N, 1, 8, 8) in [0, 1], y (N,)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0, torch.tensor(y)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seconds: float, seed: int) -> float:
    """Adam on minibatches of 64 for ``seconds``; returns the training accuracy."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def top_eigenvalues(op, k: int) -> torch.Tensor:
    """Top-k eigenvalues: closed form where the structure has it, Lanczos otherwise."""
    if isinstance(op, fl.operators.EigenOperator):
        return torch.sort(op.eigvalsh(), descending=True).values[:k]
    try:
        from fim_linops.spectral import lanczos
    except ImportError:  # pragma: no cover - spectral tools not installed
        return _eigsh_top(op, k)
    evals, _ = lanczos(op, k, which="LA")
    return torch.sort(evals, descending=True).values


def _eigsh_top(op, k: int) -> torch.Tensor:
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    def matvec(v: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (op @ torch.as_tensor(v, dtype=op.dtype).reshape(-1)).numpy()

    p = op.shape[-1]
    evals = eigsh(LinearOperator((p, p), matvec=matvec, dtype=np.float64), k=k, which="LA")[0]
    return torch.sort(torch.as_tensor(evals), descending=True).values


def demo(out: Path, seconds: float, n_examples: int, seed: int, progress: bool) -> list[dict]:
    torch.manual_seed(seed)
    x, y = load_digits_tensors()
    model = digits_cnn()
    acc = train(model, x, y, seconds, seed)
    model.eval()
    xs, ys = x[:n_examples], y[:n_examples]
    batches = [(xs[i : i + 128], ys[i : i + 128]) for i in range(0, n_examples, 128)]
    print(
        f"trained a {sum(p.numel() for p in model.parameters())}-parameter CNN on digits for "
        f"{seconds:.0f}s: train accuracy {acc:.3f}; Fisher on {n_examples} examples"
    )
    rows = []
    ops = {}
    for structure in ("implicit", "diag", "kfac"):
        t0 = time.perf_counter()
        op = fl.fisher(model, batches, structure=structure, progress=progress)
        ops[structure] = op
        build = time.perf_counter() - t0
        rows.append({"structure": structure, "build_s": build, "trace": float(fl.trace(op))})
    gen = torch.Generator().manual_seed(seed)
    probes = torch.randn(ops["implicit"].shape[-1], 8, generator=gen)
    exact = ops["implicit"] @ probes
    for row in rows:
        op = ops[row["structure"]]
        approx = op @ probes
        row["rel_error"] = float(torch.linalg.norm(approx - exact) / torch.linalg.norm(exact))
        row["top_eigenvalues"] = [float(v) for v in top_eigenvalues(op, 5)]
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| structure | build (s) | trace | rel. error vs exact | top-5 eigenvalues |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        eig = ", ".join(f"{v:.4g}" for v in r["top_eigenvalues"])
        lines.append(
            f"| {r['structure']} | {r['build_s']:.3f} | {r['trace']:.4g} | {r['rel_error']:.3g} | {eig} |"
        )
    table = "\n".join(lines)
    print(table)
    report = [
        "# fim_linops demo report",
        "",
        f"CNN on scikit-learn digits ({acc:.3f} train accuracy), Fisher of the categorical "
        f"likelihood on {n_examples} examples, exact type.",
        "",
        table,
        "",
    ]
    try:
        fig_path = _plot(ops, rows, out)
        report += [f"![spectra]({fig_path.name})", ""]
    except Exception as exc:  # plotting is a nicety; the numbers are the report
        report += [f"(no plot: {exc})", ""]
    (out / "report.md").write_text("\n".join(report))
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"report written to {out / 'report.md'}")
    return rows


def _plot(ops: dict, rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.semilogy(
            range(1, len(r["top_eigenvalues"]) + 1),
            r["top_eigenvalues"],
            "o-",
            label=r["structure"],
        )
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Top eigenvalues of the Fisher")
    ax.legend()
    path = out / "top_eigenvalues.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fim-linops", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="train a small CNN on digits and report its Fisher at every structure"
    )
    d.add_argument("--out", type=Path, default=Path("fim_linops_report"), help="report folder")
    d.add_argument("--seconds", type=float, default=5.0, help="training time in seconds")
    d.add_argument("--examples", type=int, default=512, help="examples in the Fisher")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--progress", action="store_true", help="tqdm progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.seconds, args.examples, args.seed, args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
