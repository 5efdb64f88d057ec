"""Generate ``notebooks/04_ewc.ipynb`` (continual learning with EWC on split digits) with nbformat.

Run ``python notebooks/make_04.py`` to rewrite the notebook without outputs, add ``--execute`` to
run it (nbclient, in a temporary folder) and store its outputs and figures, as committed.
"""

from __future__ import annotations

from pathlib import Path

from nbgen import main

HERE = Path(__file__).resolve().parent
PATH = HERE / "04_ewc.ipynb"

CELLS: list[tuple[str, str]] = [
    (
        "md",
        r"""# Continual learning with EWC on split digits

Task A: digits 0-4; task B: digits 5-9 (scikit-learn's 8x8 digits). One MLP with a **shared
10-way head** learns A, then B. Trained on B alone, it forgets A.

**Elastic weight consolidation** (Kirkpatrick et al., 2017) keeps the parameters that matter for A
near their values after A, $\theta_A$, by training on B with
$$
\mathcal L(\theta) = \mathcal L_B(\theta) + \lambda \cdot \tfrac12 (\theta - \theta_A)^\top
F_A (\theta - \theta_A),
$$
$F_A = \frac1{N_A}\sum_{n \in A} \mathbb E_{y \sim p(y \mid x_n, \theta_A)}\big[\nabla_\theta \log
p(y \mid x_n)\, \nabla_\theta \log p(y \mid x_n)^\top\big]$ the (exact, mean) Fisher on task A's
data. It is the Laplace approximation of the posterior after A, $\log p(\theta \mid A) \approx
-\tfrac{N_A}2 (\theta - \theta_A)^\top F_A (\theta - \theta_A)$ + const, so $\lambda = N_A$ is
the Bayesian value; in practice $\lambda$ is tuned.

`fl.fisher(model, data_A, structure="diag" | "kfac")` gives $F_A$ as a `LinearOperator`, and
`fl.ewc_penalty(F, model, anchor)` is $\tfrac12 (\theta - \theta_A)^\top F (\theta - \theta_A)$
(differentiable in the parameters, $\theta$ in `parameters_to_vector` order). The original EWC
uses the diagonal; KFAC keeps the correlations within each layer (Ritter et al., 2018).

Two ways to score a shared head: **10-way** (class-incremental: argmax over all ten classes) and
**within task** (task-incremental: the task is known at test time, argmax over its five classes).""",
    ),
    (
        "code",
        """import warnings

warnings.filterwarnings(  # a deprecation notice from a dependency's import, not ours
    "ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning
)
import copy
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display
from sklearn.datasets import load_digits
from torch import nn

import fim_linops as fl

torch.set_num_threads(1)  # small models: one thread is as fast and shares the machine better
t_start = time.perf_counter()

digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
Y = torch.tensor(digits.target)
perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
X, Y = X[perm], Y[perm]
splits = {"test": slice(0, 400), "val": slice(400, 700), "train": slice(700, None)}


def task(split, name):
    \"\"\"(x, y) of one split restricted to task A (digits 0-4) or B (5-9).\"\"\"
    x, y = X[splits[split]], Y[splits[split]]
    keep = y < 5 if name == "A" else y >= 5
    return x[keep], y[keep]


data = {(s, t): task(s, t) for s in splits for t in "AB"}
print({f"{s} {t}": len(v[1]) for (s, t), v in data.items()})""",
    ),
    (
        "md",
        """## Train on A, then the Fisher of A

A 64-64-64-10 ReLU MLP, Adam (lr 1e-3, batches of 64, 300 steps per task), fixed seeds.""",
    ),
    (
        "code",
        """def new_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def train(model, xy, steps=300, penalty=None, seed=1):
    \"\"\"Adam on the cross-entropy (+ penalty(model)) over random batches of 64.\"\"\"
    x, y = xy
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        opt.step()
    return model


def accuracy(model, xy, within=None):
    \"\"\"Fraction correct; within="A"/"B" restricts the argmax to that task's five classes.\"\"\"
    x, y = xy
    with torch.no_grad():
        logits = model(x)
    if within is not None:
        classes = torch.arange(10)
        mine = classes < 5 if within == "A" else classes >= 5
        logits = logits.masked_fill(~mine, float("-inf"))
    return float((logits.argmax(-1) == y).float().mean())


model_a = train(new_model(), data["train", "A"], seed=1)
anchor = nn.utils.parameters_to_vector(model_a.parameters()).detach()  # theta_A, (P,)
print(f"P = {anchor.numel()}, after A: test accuracy on A {accuracy(model_a, data['test', 'A']):.3f}")

fishers = {
    s: fl.fisher(model_a, data["train", "A"], "categorical", structure=s) for s in ("diag", "kfac")
}
for s, F in fishers.items():
    print(f"F_A {s:4s}: {type(F).__name__}, trace {float(fl.trace(F)):.3f}, "
          f"v^T F v along theta_A {float(fl.quad(F, anchor)):.3f}")""",
    ),
    (
        "md",
        r"""## Train on B: plain fine-tuning and EWC, sweeping $\lambda$

Each run starts from $\theta_A$ and trains 300 steps on B with the same seed. $\lambda$ is chosen per
Fisher structure by the mean 10-way accuracy on A and B over the **validation** split; the test
split is only read for the final table.""",
    ),
    (
        "code",
        """def after_b(F=None, lam=0.0):
    \"\"\"Train a copy of model_a on B (with lam * ewc_penalty when F is given); its accuracies.\"\"\"
    model = copy.deepcopy(model_a)
    penalty = None if F is None else (lambda m: lam * fl.ewc_penalty(F, m, anchor))
    train(model, data["train", "B"], penalty=penalty, seed=2)
    return {
        (split, t, within): accuracy(model, data[split, t], t if within else None)
        for split in ("val", "test")
        for t in "AB"
        for within in (False, True)
    }


t0 = time.perf_counter()
runs = {("plain", 0.0): after_b()}
lambdas = [10.0, 100.0, 1000.0, 3000.0, 10000.0]
for s, F in fishers.items():
    for lam in lambdas:
        runs[s, lam] = after_b(F, lam)
print(f"{len(runs)} runs on B in {time.perf_counter() - t0:.1f} s\\n")


def val_score(r):
    return (r["val", "A", False] + r["val", "B", False]) / 2


print(f"{'Fisher':6s} {'lambda':>8s}   validation: {'A 10-way':>9s} {'B 10-way':>9s} {'mean':>6s}"
      f" {'A within':>9s}")
for (s, lam), r in runs.items():
    print(f"{s:6s} {lam:8g}   {'':11s} {r['val', 'A', False]:9.3f} {r['val', 'B', False]:9.3f}"
          f" {val_score(r):6.3f} {r['val', 'A', True]:9.3f}")
best = {s: max(lambdas, key=lambda lam: val_score(runs[s, lam])) for s in fishers}
print("chosen lambda:", best)""",
    ),
    (
        "code",
        """fig, ax = plt.subplots(figsize=(6.5, 4))
for s, marker in (("diag", "o"), ("kfac", "s")):
    for t, ls in (("A", "-"), ("B", "--")):
        ax.semilogx(lambdas, [runs[s, lam]["val", t, False] for lam in lambdas], ls=ls,
                    marker=marker, label=f"EWC {s}: task {t}")
for t, ls in (("A", "-"), ("B", "--")):
    ax.axhline(runs["plain", 0.0]["val", t, False], color="gray", ls=ls, lw=1,
               label=f"plain: task {t}")
ax.set_xlabel("$\\\\lambda$")
ax.set_ylabel("10-way validation accuracy after B")
ax.set_title("EWC strength sweep")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("ewc_lambda_sweep.png", dpi=80)
plt.close(fig)
display(Image("ewc_lambda_sweep.png"))""",
    ),
    (
        "md",
        """## Test accuracy after training on B

With the chosen $\\lambda$ per structure (and, for reference, task A's accuracy right after A):""",
    ),
    (
        "code",
        """chosen = {
    "plain fine-tuning": runs["plain", 0.0],
    f"EWC diag (lambda={best['diag']:g})": runs["diag", best["diag"]],
    f"EWC KFAC (lambda={best['kfac']:g})": runs["kfac", best["kfac"]],
}
print(f"after A only: A 10-way {accuracy(model_a, data['test', 'A']):.3f}\\n")
print(f"{'method':28s} {'A 10-way':>9s} {'B 10-way':>9s} {'A within':>9s} {'B within':>9s}")
for name, r in chosen.items():
    print(f"{name:28s} {r['test', 'A', False]:9.3f} {r['test', 'B', False]:9.3f}"
          f" {r['test', 'A', True]:9.3f} {r['test', 'B', True]:9.3f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
width = 0.38
for ax, within, title in ((axes[0], False, "10-way (class-incremental)"),
                          (axes[1], True, "within task (task-incremental)")):
    for i, (name, r) in enumerate(chosen.items()):
        bars = ax.bar([i - width / 2, i + width / 2],
                      [r["test", "A", within], r["test", "B", within]], width,
                      color=["tab:blue", "tab:orange"])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(chosen)), [n.replace(" (", "\\n(") for n in chosen], fontsize=8)
    ax.set_title(f"test accuracy after B, {title}")
    ax.set_ylim(0, 1.2)
axes[0].legend(bars, ["task A (0-4)", "task B (5-9)"], loc="upper center", ncol=2, fontsize=8)
axes[0].set_ylabel("accuracy")
fig.tight_layout()
fig.savefig("ewc_accuracy.png", dpi=80)
plt.close(fig)
display(Image("ewc_accuracy.png"))
print(f"notebook ran in {time.perf_counter() - t_start:.1f} s")""",
    ),
    (
        "md",
        """**Reading the results** (the run stored here). With a shared head, plain fine-tuning on B erases
task A in the 10-way score (accuracy 0): every A image is now given a class from 5-9. Scored
within the task, A survives much better, so most of the forgetting sits in the head's choice
between the tasks.

* EWC with the **diagonal** Fisher protects A within the task but barely in the 10-way score: no
  $\\lambda$ of the sweep lifts A's 10-way accuracy much, while large $\\lambda$ costs B.
* EWC with the **KFAC** Fisher, which keeps the correlations between the weights of a layer, holds
  A far better from $\\lambda = 1000$ up; at the largest $\\lambda$ it keeps A almost intact in
  the 10-way score, at the price of learning B much worse. The sweep shows a trade-off, not a free
  lunch: with one shared head, class-incremental learning remains hard for regularisation methods
  (van de Ven and Tolias, 2019). The criterion decides the point on the curve: the mean of the two
  10-way accuracies picks the largest $\\lambda$ for KFAC; one weighting B more would pick 1000 to
  3000.
* The two Fishers have about the same trace, but their quadratic forms along $\\theta_A$ differ
  several-fold: they weigh directions differently, not just by a scale, so the same $\\lambda$
  is a different strength for each and each needs its own sweep.""",
    ),
]


if __name__ == "__main__":
    main(CELLS, PATH)
