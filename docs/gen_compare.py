"""Generate the tables and figure of ``docs/choosing.md`` from a real run of ``fl.compare``.

Trains the demo CNN of ``fim-linops demo`` (Conv 1->8, Conv 8->16 stride 2, Linear 256->10;
P = 3,818) on scikit-learn's digits for a fixed number of epochs, then measures every Fisher
structure against the exact Fisher of the trained model on ``--examples`` digits with
``fl.compare(..., method="dense")`` (F densified once, exact relative errors). Writes

* ``docs/assets/compare.md``: where and when it ran, then the table of ``Comparison.table()``;
* ``docs/assets/compare.csv``: the raw rows;
* ``docs/assets/compare.png``: the error and the top-k overlap against stored bytes.

Run from the repository root: ``python docs/gen_compare.py`` (about a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fim_linops as fl  # noqa: E402
from fim_linops.cli import digits_cnn, load_digits_tensors  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"

#: table label -> structure given to fl.fisher (a name or a per-layer mix)
STRUCTURES: dict[str, object] = {
    "dense": "dense",
    "block_diag": "block_diag",
    "diag": "diag",
    "quasi_diag": "quasi_diag",
    "kfac": "kfac",
    "ekfac": "ekfac",
    "kron_sum": "kron_sum",
    "lowrank": "lowrank",
    "mix(Conv2d: ekfac, Linear: block_diag)": {nn.Conv2d: "ekfac", nn.Linear: "block_diag"},
}


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int):
    """Adam (lr 3e-3) on shuffled minibatches of 64 for ``epochs`` epochs; training accuracy."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def machine() -> str:
    """A one-line description of where this ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} torch threads, {platform.system()}, torch {torch.__version__} (CPU)"


def plot(result: fl.Comparison, path: Path) -> None:
    """Two panels against stored bytes (both independent of the machine's load): the relative
    Frobenius error and the top-k eigenvector overlap, one labelled point per structure."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("rel_error", r"$\|F_S - F\|_F \,/\, \|F\|_F$", "error against the exact Fisher"),
        ("overlap", f"top-{result.top_k} eigenvector overlap", "subspace of the top eigenvectors"),
    )
    for ax, (key, ylabel, title) in zip(axes, panels, strict=True):
        for r in result.rows:
            ax.scatter(r["stored_bytes"], r[key])
            ax.annotate(
                r["structure"].split("(")[0],
                (r["stored_bytes"], r[key]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_xlabel("stored bytes")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.05, 1.1)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{title} (P = {result.n_params})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x, y = load_digits_tensors()
    model = digits_cnn()
    acc = train_epochs(model, x, y, args.epochs, args.seed)
    model.eval()
    xs, ys = x[: args.examples], y[: args.examples]
    batches = [(xs[i : i + 128], ys[i : i + 128]) for i in range(0, args.examples, 128)]

    result = fl.compare(
        model,
        batches,
        structures=STRUCTURES,
        top_k=args.top_k,
        method="dense",
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"Generated by `python docs/gen_compare.py` on {stamp}; machine: {machine()}; "
        f"{os.cpu_count()} CPUs visible, shared with other jobs (1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end: build times and peaks are indicative only). "
        f"Model: the digits CNN, P = {result.n_params} parameters, trained {args.epochs} epochs "
        f"(train accuracy {acc:.3f}); exact categorical Fisher on {args.examples} digits; "
        f"reference: {result.reference}; `lowrank` keeps the top {max(args.top_k, 10)} "
        "eigenpairs and `kron_sum` 1 Kronecker term per layer."
    )
    (args.out / "compare.md").write_text(header + "\n\n" + result.table() + "\n")
    result.to_csv(args.out / "compare.csv")
    plot(result, args.out / "compare.png")
    print(header)
    print()
    print(result.table())


if __name__ == "__main__":
    main()
