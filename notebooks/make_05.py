"""Generate ``notebooks/05_language_model.ipynb`` (a character-level transformer: its Fisher's
spectrum, KFAC against the exact Fisher, a KFAC Laplace over its last block) with nbformat.

Run ``python notebooks/make_05.py`` to rewrite the notebook without outputs, add ``--execute`` to
run it (nbclient, in a temporary folder) and store its outputs and figures, as committed.
"""

from __future__ import annotations

from pathlib import Path

from nbgen import main

HERE = Path(__file__).resolve().parent
PATH = HERE / "05_language_model.ipynb"

CELLS: list[tuple[str, str]] = [
    (
        "md",
        r"""# The Fisher of a small language model

A nanoGPT-style character transformer (`fim_linops.examples.nanogpt.NanoGPT`: token and position
embeddings, pre-LayerNorm blocks of causal self-attention and an MLP, an LM head) is trained on the
public-domain text shipped with the package (`char_dataset`: the US Declaration of Independence
and four Shakespeare passages, about 11 KB). Its output is a (N, T, V) tensor of next-character
logits, and fim_linops takes it as it is: every position is a term of the likelihood,
$$
F = \frac1N \sum_{n=1}^N \sum_{t=1}^T \mathbb E_{y_t \sim p(\cdot \mid x_{n, \le t})}
\big[\nabla_\theta \log p(y_t \mid x_{n,\le t})\, \nabla_\theta \log p(y_t \mid x_{n,\le t})^\top\big],
$$
the Fisher of each sequence's joint likelihood under teacher forcing, averaged over sequences
(`positions="sum"`, the default; `fl.Categorical(positions="mean")` divides by the number of
tokens instead). Labels equal to -100 would drop their position; `shift_labels=True` would score
the logits at $t$ against the label at $t + 1$ (here the dataset already shifts them).

Three uses:

1. the top of the Fisher's spectrum by Lanczos on exact implicit products (never a P x P matrix);
2. how close KFAC (and the diagonal) come to the exact Fisher (`fl.compare`);
3. a KFAC Laplace posterior over the last transformer block (`params=`), and the per-token
   predictive entropy it gives, next to the trained network's own.

A note on cost. The exact Fisher of per-token outputs back-propagates one column per position and
class of the Hessian's square root, $T(V - 1)$ per sequence, while a Monte Carlo Fisher
(`fisher_type="mc"`) needs one column per sample whatever $V$ and $T$. Exact *products*
(`structure="implicit"`) need neither: one forward-mode and one reverse-mode pass per product.""",
    ),
    (
        "code",
        """import warnings

warnings.filterwarnings(  # a deprecation notice from a dependency's import, not ours
    "ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning
)
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display
from torch import nn

import fim_linops as fl
from fim_linops.examples.nanogpt import GPTConfig, NanoGPT, char_dataset

torch.set_num_threads(1)  # a small model: one thread is as fast and shares the machine better
t_start = time.perf_counter()""",
    ),
    (
        "md",
        r"""## 1. Data and training

Windows of 32 characters (inputs) and the same windows shifted by one (labels), without overlap;
the last 10% of the windows are held out. Two blocks of width 48 with 4 heads (about 62k
parameters), AdamW, batches of 32 sequences, 250 steps (about where the validation loss stops
falling on 11 KB of text).""",
    ),
    (
        "code",
        """torch.manual_seed(0)
T = 32
x, y, vocab = char_dataset(T)
n_val = len(x) // 10
x_tr, y_tr, x_val, y_val = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
V = len(vocab)
model = NanoGPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=4, n_embd=48))
P = sum(p.numel() for p in model.parameters())
print(f"{len(x_tr)} training and {n_val} validation windows of {T} characters, V = {V}, P = {P:,}")


def mean_nll(m, xs, ys):
    return nn.functional.cross_entropy(m(xs).flatten(0, 1), ys.flatten())


opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
steps, batch = 250, 32
gen = torch.Generator().manual_seed(0)
t0 = time.perf_counter()
for step in range(steps + 1):
    idx = torch.randint(len(x_tr), (batch,), generator=gen)
    loss = mean_nll(model, x_tr[idx], y_tr[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        with torch.no_grad():
            val = mean_nll(model, x_val, y_val)
        print(f"step {step:4d}: train nll {loss.item():.3f}, validation nll {float(val):.3f} nats/char")
print(f"trained in {time.perf_counter() - t0:.0f} s")
model.eval()
prompt = vocab.encode("We hold these ")[None]
print(repr(vocab.decode(model.generate(prompt, 60, temperature=0.8)[0])))""",
    ),
    (
        "md",
        r"""## 2. The top of the spectrum

`fl.fisher(..., structure="implicit")` is the exact Fisher as a `LinearOperator` that only
computes products $Fv = \frac1N \sum_n J_n^\top H_n J_n v$ (a Jacobian-vector product, the output
Hessian, a vector-Jacobian product). `fl.spectral.lanczos` finds its top eigenvalues from a few
dozen such products, on 32 training windows.""",
    ),
    (
        "code",
        """fit = (x_tr[:32], y_tr[:32])
F_exact = fl.fisher(model, fit, structure="implicit")
t0 = time.perf_counter()
top, _ = fl.spectral.lanczos(F_exact, k=6, which="LA")
top = top.flip(0)
print(f"top-6 eigenvalues of the exact Fisher ({time.perf_counter() - t0:.1f} s):")
print("  " + ", ".join(f"{float(e):.3g}" for e in top))
tr = float(fl.spectral.trace(F_exact, 20))
print(f"trace (Hutchinson, 20 probes): {tr:.3g}; the top eigenvalue holds {float(top[0]) / tr:.1%} of it")""",
    ),
    (
        "md",
        r"""## 3. KFAC against the exact Fisher

`fl.compare` builds each approximation and measures it against the exact Fisher: the relative
Frobenius error $\lVert \hat F - F \rVert_F / \lVert F \rVert_F$ (Hutchinson estimates with exact
implicit products, since P is large) and the overlap of the top-5 eigenvectors. KFAC ("expand":
every position an extra row of the Kronecker factors) covers the Linear layers; the LayerNorm and
embedding parameters get exact diagonal or dense blocks (`F.describe()` says which). The exact
statistics cost $T (V - 1)$ back-propagated columns per sequence, so this runs on 8 windows of 8
characters.""",
    ),
    (
        "code",
        """few = (x_tr[:8, :8], y_tr[:8, :8])
comparison = fl.compare(model, few, structures=("diag", "kfac", "ekfac"), n_probes=20, top_k=5)
print(comparison)
print()
print(fl.fisher(model, few, structure="kfac", fisher_type="mc").describe())""",
    ),
    (
        "md",
        r"""## 4. A KFAC Laplace over the last block, and per-token uncertainty

`fl.laplace.Laplace(model, data, structure="kfac", params=[model.h[-1]])` puts a Gaussian posterior
$\mathcal N(\theta^*, (G + \delta I)^{-1})$ on the last transformer block (the rest stays at its
trained value), $G$ the KFAC GGN summed over the training windows. Here $G$ is the Monte Carlo GGN
with 2 sampled labels per position (`fisher_type="mc", mc_samples=2`), which costs 2
back-propagated columns per batch instead of $T (V - 1)$. The prior precision $\delta$ maximises the
Laplace evidence.

The linearised predictive treats the positions of a sequence as its outputs: `predictive(x)` gives
the mean (N, T V) in row-major order (position, then class) and the covariance of those T V
logits. Per token, the probit approximation
$p(y_t) \approx \mathrm{softmax}\big(\mu_t / \sqrt{1 + \tfrac\pi8 \sigma^2_t}\big)$ with
$\sigma^2_t$ the diagonal of the covariance at position $t$ gives the predictive distribution and
its entropy, in nats, next to the entropy of the trained network's own softmax.""",
    ),
    (
        "code",
        """train = [(x_tr[i : i + 32], y_tr[i : i + 32]) for i in range(0, len(x_tr), 32)]
t0 = time.perf_counter()
la = fl.laplace.Laplace(
    model, train, "categorical", structure="kfac", params=[model.h[-1]],
    fisher_type="mc", mc_samples=2, generator=torch.Generator().manual_seed(0),
)
la.optimize_prior_precision(n_steps=30, lr=0.1)
print(f"{la}: prior precision {float(la.prior_precision):.3g}, "
      f"log evidence {float(la.log_marginal_likelihood()):.1f} ({time.perf_counter() - t0:.1f} s)")

text = vocab.decode(x_val[1])
ids = vocab.encode(text)[None]
mean, cov = la.predictive(ids)  # (1, T*V), (1, T*V, T*V)
mu = mean.view(T, V)
var = cov[0].diagonal().view(T, V)
p_map = mu.softmax(-1)
p_la = (mu / torch.sqrt(1 + math.pi / 8 * var)).softmax(-1)


def entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


h_map, h_la = entropy(p_map), entropy(p_la)
target = vocab.encode(vocab.decode(y_val[1]))
print(f"text: {text!r}")
print(f"mean entropy: network {float(h_map.mean()):.3f}, Laplace {float(h_la.mean()):.3f} nats; "
      f"nll of the next character: network {float(-p_map[range(T), target].log().mean()):.3f}, "
      f"Laplace {float(-p_la[range(T), target].log().mean()):.3f}")""",
    ),
    (
        "code",
        """fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(15, 3.8), gridspec_kw={"width_ratios": [1, 3]})
ax0.semilogy(range(1, len(top) + 1), top.detach(), "o-")
ax0.set_xlabel("index")
ax0.set_ylabel("eigenvalue")
ax0.set_title("top of the exact Fisher's spectrum (Lanczos)")
pos = torch.arange(T)
ax1.bar(pos - 0.2, h_map.detach(), width=0.4, label="trained network")
ax1.bar(pos + 0.2, h_la.detach(), width=0.4, label="KFAC Laplace (last block)")
ax1.set_xticks(pos, [repr(c)[1:-1] or " " for c in text])
ax1.set_xlabel("input character (the entropy is of the prediction of the next one)")
ax1.set_ylabel("predictive entropy (nats)")
ax1.set_title("per-token predictive entropy")
ax1.legend()
fig.tight_layout()
fig.savefig("language_model.png", dpi=80)
plt.close(fig)
display(Image("language_model.png"))
print(f"notebook ran in {time.perf_counter() - t_start:.1f} s")""",
    ),
    (
        "md",
        r"""**Reading the results** (the run stored here). The top eigenvalues fall off slowly at first:
the top one holds a few percent of the trace. On this transformer every cheap structure leaves
most of the exact Fisher's Frobenius norm out (relative errors above 0.8: the Fisher of a
sequence model couples the layers and positions strongly), but KFAC and EKFAC share far more of
the top eigenvectors than the diagonal. The KFAC Laplace over the last block raises the mean
per-token entropy while the held-out negative log-likelihood of the shown line barely moves; the
bars show at which characters the posterior adds the most uncertainty.""",
    ),
]


if __name__ == "__main__":
    main(CELLS, PATH)
