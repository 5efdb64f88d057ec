"""Generate ``notebooks/03_fishleg.ipynb`` (FishLeg on the deep auto-encoder, issue 7) with nbformat.

Run ``python notebooks/make_03.py`` to rewrite the notebook without outputs, add ``--execute`` to
run it (nbclient, in a temporary folder) and store its outputs and figures, as committed. The
notebook reads ``benchmarks/fishleg_results/curves.csv`` (written by ``bench_fishleg.py``) when it
is there, so run the benchmark first.
"""

from __future__ import annotations

from pathlib import Path

from nbgen import main

HERE = Path(__file__).resolve().parent
PATH = HERE / "03_fishleg.ipynb"

CELLS: list[tuple[str, str]] = [
    (
        "md",
        r"""# FishLeg on the deep auto-encoder

`fl.FishLeg` is a `torch.optim.Optimizer` that learns an approximation $Q(\lambda) \approx (F + \gamma I)^{-1}$
of the damped inverse Fisher by minimising the auxiliary loss
$A(\lambda) = \tfrac12 u^\top Q F_\gamma Q u - u^\top Q u$ (one exact Fisher-vector product per auxiliary step),
and moves the parameters along $-\eta\, Q g$. Per layer, $Q = R^\top R \otimes L L^\top$ over $[W \mid b]$.

This notebook shows the curves of `benchmarks/bench_fishleg.py` (issue 7): the classic deep auto-encoder
task at sklearn-digits scale (1,500 training digits, 297 test digits, a 10-layer auto-encoder
64-256-128-64-32-8-32-64-128-256-64 initialised as in the FishLeg paper, $W \sim \mathcal N(0, 1/\text{fan-in})$,
$b = 0$; Bernoulli likelihood on the 64 pixels scaled to [0, 1], batch 100),
FishLeg against Adam, SGD with momentum and natural gradient with our KFAC.
The loss is the Bernoulli negative log-likelihood summed over the 64 pixels, averaged over examples.
All optimisers of a seed run in lockstep (one step of each in turn) on one CPU thread; times are the
process CPU time of the training steps, which the other jobs of a shared machine do not inflate.

If the benchmark's saved results (`benchmarks/fishleg_results/curves.csv`) are found next to the
installed package they are loaded; otherwise a short version (200 steps, 1 seed) is run here.""",
    ),
    (
        "code",
        r"""import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import fim_linops as fl

torch.set_num_threads(1)
REPO = Path(fl.__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
CSV = BENCH / "fishleg_results" / "curves.csv"
print("results file:", CSV, "found" if CSV.exists() else "absent")""",
    ),
    (
        "code",
        r"""def load_csv(path):
    results, labels = {}, {}
    with open(path) as f:
        for r in csv.DictReader(f):
            labels[r["optimiser"]] = r["label"]
            results.setdefault(r["optimiser"], []).append(
                dict(seed=int(r["seed"]), step=int(r["step"]), time_s=float(r["time_s"]),
                     cpu_s=float(r["cpu_s"]), train=float(r["train"]), test=float(r["test"]))
            )
    return results, labels


if CSV.exists():
    results, labels = load_csv(CSV)
    source = "saved benchmark results"
else:  # short version: 200 steps, 1 seed, default settings of the benchmark
    sys.path.insert(0, str(BENCH))
    import bench_fishleg as B

    Xtr, Xte = B.load_data()
    configs = [("adam", dict(lr=3e-3)), ("sgd", dict(lr=B.SGD_LRS[0])), ("kfac", B.KFAC),
               ("fishleg", B.FISHLEG)]
    B.run_lockstep(configs, 99, 20, Xtr, Xte)  # warm-up: first-call costs of torch.optim, torch.func
    runs = B.run_lockstep(configs, 0, 200, Xtr, Xte)
    results = {n: [dict(r, seed=0) for r in rows] for (n, _), rows in zip(configs, runs)}
    labels = {"adam": "Adam (lr 0.003)", "sgd": "SGD+momentum", "kfac": "KFAC NG", "fishleg": "FishLeg"}
    source = "short run (200 steps, 1 seed)"
seeds = len({r["seed"] for r in next(iter(results.values()))})
print(source, "|", ", ".join(labels.values()), "|", seeds, "seed(s)")""",
    ),
    (
        "code",
        r"""def mean_curve(rows, key):
    by = {}
    for r in rows:
        by.setdefault(r["step"], []).append(r[key])
    return {s: sum(v) / len(v) for s, v in sorted(by.items())}


fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
for name, rows in results.items():
    tr, te, tc = (mean_curve(rows, k) for k in ("train", "test", "cpu_s"))
    (line,) = axes[0].plot(list(tr), list(tr.values()), label=labels[name])
    axes[0].plot(list(te), list(te.values()), ls="--", color=line.get_color())
    axes[1].plot(list(tc.values()), list(tr.values()), color=line.get_color())
    axes[2].plot(list(tr), list(tc.values()), color=line.get_color())
axes[0].set(xlabel="step", ylabel="loss (train solid, test dashed)", yscale="log")
axes[1].set(xlabel="CPU time of the training steps (s)", ylabel="train loss", yscale="log")
axes[2].set(xlabel="step", ylabel="cumulative CPU time (s)")
axes[0].legend()
fig.suptitle(f"Deep auto-encoder on digits ({source}, mean over {seeds} seed(s))")
fig.tight_layout()
fig.savefig("fishleg_curves.png", dpi=80)""",
    ),
    (
        "code",
        r"""# the table: final losses, when each optimiser reaches Adam's final training loss, cost per step
adam_tr, adam_tc = mean_curve(results["adam"], "train"), mean_curve(results["adam"], "cpu_s")
last = max(adam_tr)
target, adam_per_step = adam_tr[last], adam_tc[last] / last
print(f"target = Adam's final train loss {target:.2f} (step {last})\n")
print(f"{'optimiser':62s} {'train':>6s} {'test':>6s} {'reaches it':>10s} {'CPU s':>6s} {'CPU/step':>8s}")
for name, rows in results.items():
    tr, te, tc = (mean_curve(rows, k) for k in ("train", "test", "cpu_s"))
    s = max(tr)
    hit = next((k for k, v in tr.items() if v <= target), None)
    when = f"{tc[hit]:.1f}" if hit else "-"
    print(f"{labels[name]:62s} {tr[s]:6.2f} {te[s]:6.2f} {str(hit) if hit else 'never':>10s} "
          f"{when:>6s} {tc[s] / s / adam_per_step:7.2f}x")""",
    ),
    (
        "md",
        r"""## Using FishLeg

The optimiser replaces `torch.optim.Adam` in the ordinary loop; its learned inverse Fisher is a
block-diagonal `LinearOperator` of shape (P, P) with Kronecker blocks (`@`, `diagonal()`,
`root_decomposition()`). A few steps on a small auto-encoder:""",
    ),
    (
        "code",
        r"""from sklearn.datasets import load_digits
from torch import nn


class PixelBernoulli(fl.Likelihood):
    # 64 independent Bernoulli pixels on logits f (N, 64)
    name = "pixel_bernoulli"

    def nll(self, f, y):
        return nn.functional.binary_cross_entropy_with_logits(f, y, reduction="none").sum(-1)

    def grad_output(self, f, y):
        return torch.sigmoid(f) - y

    def sample(self, f, n_samples, generator=None):
        return torch.bernoulli(torch.sigmoid(f.detach()).expand(n_samples, *f.shape), generator=generator)

    def hessian_sqrt(self, f):
        p = torch.sigmoid(f.detach())
        return torch.diag_embed((p * (1 - p)).sqrt())

    def hessian_matmul(self, f, v):
        p = torch.sigmoid(f.detach())
        return p * (1 - p) * v


X = torch.tensor(load_digits().data[:500] / 16.0, dtype=torch.float32)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64))
aux = [(X[i : i + 100], X[i : i + 100]) for i in range(0, 500, 100)]
opt = fl.FishLeg(model, PixelBernoulli(), aux, lr=0.1, damping=0.5, aux_lr=1e-3, update_aux_every=5, init="kfac")
loss_fn = lambda f, x: nn.functional.binary_cross_entropy_with_logits(f, x, reduction="sum") / len(x)
for step in range(100):
    x = X[torch.randint(0, len(X), (100,))]
    opt.zero_grad()
    loss = loss_fn(model(x), x)
    loss.backward()
    opt.step()
    if step % 25 == 0:
        print(f"step {step:3d}  loss {loss.item():.2f}  auxiliary loss {opt.aux_loss.item():.4f}")
Q = opt.inverse_fisher
print(type(Q).__name__, tuple(Q.shape), "diagonal mean", Q.diagonal().mean().item())""",
    ),
]


if __name__ == "__main__":
    main(CELLS, PATH)
