"""Generate ``notebooks/06_influence.ipynb`` (influence functions on digits with flipped labels).

Run ``python notebooks/make_06.py`` to rewrite the notebook without outputs, add ``--execute`` to
run it (nbclient, in a temporary folder) and store its outputs and figures, as committed.
"""

from __future__ import annotations

from pathlib import Path

from nbgen import main

HERE = Path(__file__).resolve().parent
PATH = HERE / "06_influence.ipynb"

CELLS: list[tuple[str, str]] = [
    (
        "md",
        r"""# Influence functions: which training examples made this prediction

The influence of training example $j$ on query $i$ (Koh and Liang, 2017; EK-FAC influence,
Grosse et al., 2023) is
$$
s_{ij} = g_i^\top (F + \delta I)^{-1} g_j ,
$$
$g$ the gradient of an example's negative log-likelihood of its own label, $F$ the Fisher of the
training data (here EK-FAC) and $\delta$ a damping. Positive: up-weighting $j$ lowers query
$i$'s loss (a *helpful* example); negative: *harmful*. The **self-influence** $s_{jj}$ is large
for examples the model can only fit by bending to them: mislabelled or atypical ones.

`fl.influence(model, train, query)` returns the (n_query, n_train) matrix,
`fl.self_influence(model, train)` its diagonal for the training set, and
`fl.top_influences(model, train, query, k)` the k most helpful (or harmful) training examples
per query, without the full matrix.

Here: scikit-learn's 8x8 digits with **5% of the training labels flipped** to a wrong class. Does
ranking the training set by self-influence find the flipped labels, and better than ranking by
training loss?""",
    ),
    (
        "code",
        """import warnings

warnings.filterwarnings(  # a deprecation notice from a dependency's import, not ours
    "ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning
)
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import nn

import fim_linops as fl

t_start = time.perf_counter()
torch.manual_seed(0)
torch.set_num_threads(2)
d = load_digits()
x = torch.tensor(d.data, dtype=torch.float32) / 16.0
y = torch.tensor(d.target, dtype=torch.long)
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
x, y = x[perm], y[perm]
n_train = 1200
xt, yt_clean, xq, yq = x[:n_train], y[:n_train], x[n_train:], y[n_train:]

# flip 5% of the training labels to a random other class
g = torch.Generator().manual_seed(1)
flipped = torch.zeros(n_train, dtype=torch.bool)
flipped[torch.randperm(n_train, generator=g)[: n_train // 20]] = True
yt = yt_clean.clone()
yt[flipped] = (yt[flipped] + torch.randint(1, 10, (int(flipped.sum()),), generator=g)) % 10
print(f"{n_train} training digits, {int(flipped.sum())} flipped labels; {len(yq)} test digits")""",
    ),
    (
        "md",
        """A small MLP, trained long enough to fit most of the flipped labels (the regime where they
are hardest to spot by their loss).""",
    ),
    (
        "code",
        """model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
opt = torch.optim.Adam(model.parameters(), lr=5e-3)
for epoch in range(80):
    for i in range(0, n_train, 100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt[i : i + 100]), yt[i : i + 100]).backward()
        opt.step()
model.eval()
with torch.no_grad():
    train_loss = nn.functional.cross_entropy(model(xt), yt, reduction="none")
    fit = (model(xt).argmax(1) == yt).float()
    test_acc = (model(xq).argmax(1) == yq).float().mean()
print(f"fits {fit[~flipped].mean():.1%} of the clean and {fit[flipped].mean():.1%} of the "
      f"flipped training labels; test accuracy {test_acc:.1%}")""",
    ),
    (
        "md",
        """## Finding the flipped labels

Self-influence with the EK-FAC Fisher of the training data (damping $10^{-3}$), against the
training loss as the baseline ranking. The area under the ROC curve (AUC) says how well each score
separates flipped from clean labels (1: perfectly, 0.5: chance); the curve below shows how many of
the flipped labels one finds by checking the top of each ranking.""",
    ),
    (
        "code",
        """train = [(xt[i : i + 300], yt[i : i + 300]) for i in range(0, n_train, 300)]
F = fl.fisher(model, train, structure="ekfac")  # built once, reused below
t0 = time.perf_counter()
self_inf = fl.self_influence(model, train, structure=F, damping=1e-3)
print(f"self-influence of {n_train} examples in {time.perf_counter() - t0:.2f} s")

auc_inf = roc_auc_score(flipped.numpy(), self_inf.numpy())
auc_loss = roc_auc_score(flipped.numpy(), train_loss.numpy())
print(f"AUC, self-influence: {auc_inf:.3f}   training loss: {auc_loss:.3f}")


def found(score):
    order = torch.argsort(score, descending=True)
    return torch.cumsum(flipped[order].float(), 0) / flipped.sum()


checked = np.arange(1, n_train + 1) / n_train
top = n_train // 10
print(f"flipped labels among the top 10% of the ranking: self-influence "
      f"{found(self_inf)[top - 1]:.0%}, training loss {found(train_loss)[top - 1]:.0%}")
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(checked, found(self_inf), label=f"self-influence (AUC {auc_inf:.3f})")
ax.plot(checked, found(train_loss), label=f"training loss (AUC {auc_loss:.3f})")
ax.plot(checked, np.minimum(checked * n_train / int(flipped.sum()), 1), "k:", label="oracle")
ax.set_xlabel("fraction of the training set checked (top of the ranking)")
ax.set_ylabel("fraction of flipped labels found")
ax.set_xlim(0, 0.3)
ax.legend()
fig.tight_layout()
fig.savefig("influence_flipped.png", dpi=80)
plt.close(fig)
display(Image("influence_flipped.png"))""",
    ),
    (
        "md",
        """## The most helpful and most harmful training images

For a few test digits, `fl.top_influences` returns the training examples with the largest
(helpful) and smallest (harmful) scores, streaming over the training data with a running top-k.
Flipped training labels are marked in red.""",
    ),
    (
        "code",
        """queries = (xq[:4], yq[:4])
k = 4
help_v, help_i = fl.top_influences(model, train, queries, k=k, structure=F, damping=1e-3)
harm_v, harm_i = fl.top_influences(
    model, train, queries, k=k, structure=F, damping=1e-3, largest=False
)
fig, axes = plt.subplots(4, 1 + 2 * k, figsize=(1.2 * (1 + 2 * k), 5.2))
for r in range(4):
    row = [(xq[r], f"test: {int(yq[r])}", "k")]
    for idx, val in zip(help_i[r], help_v[r]):
        row.append((xt[idx], f"+ {int(yt[idx])} ({val:.2g})", "r" if flipped[idx] else "g"))
    for idx, val in zip(harm_i[r], harm_v[r]):
        row.append((xt[idx], f"- {int(yt[idx])} ({val:.2g})", "r" if flipped[idx] else "b"))
    for ax, (img, title, color) in zip(axes[r], row):
        ax.imshow(img.reshape(8, 8), cmap="gray_r")
        ax.set_title(title, fontsize=8, color=color)
        ax.axis("off")
fig.suptitle("test digit | 4 most helpful (+ label) | 4 most harmful (- label); red: flipped",
             fontsize=9)
fig.tight_layout()
fig.savefig("influence_top.png", dpi=80)
plt.close(fig)
display(Image("influence_top.png"))
print(f"notebook ran in {time.perf_counter() - t_start:.1f} s")""",
    ),
    (
        "md",
        """**Reading the results.** The most helpful training images of a test digit are clean
examples of its class drawn alike; the most harmful ones are training images that look like the
test digit but carry another label, and in the stored run most of them are flipped labels (red):
they pull the model toward the wrong class. The scale of the scores differs from query to query
(a confidently classified test digit has a small gradient, hence small scores). Self-influence ranks the training set for a data-cleaning pass: the
curve above shows how many of the flipped labels one finds by checking the top of the ranking,
against checking the examples with the highest training loss (the printed AUCs of the stored run
compare the two; on this small, easy problem both rankings are strong). A memorised flipped
label has a small loss, but the model had to bend to fit it: that is what self-influence
measures, so it keeps finding flipped labels that the network has already fitted.""",
    ),
]


if __name__ == "__main__":
    main(CELLS, PATH)
