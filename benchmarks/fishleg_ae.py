r"""The deep auto-encoder task of ``bench_fishleg.py`` (issue 7) and its optimisers, shared with
``bench_fishleg_defaults.py`` and ``notebooks/03_fishleg``.

Task (the classic deep auto-encoder benchmark, at sklearn-digits scale): 1,500 digits for training,
the other 297 for test; pixels scaled to [0, 1] (x / 16); a 10-layer auto-encoder
64-256-128-64-32-8-32-64-128-256-64 (ReLU, linear 8-unit code, 64 output logits); loss = the
Bernoulli negative log-likelihood of the pixels summed over the 64 pixels, mean over examples
(binary cross-entropy with soft targets); batch 100 (epochs of shuffled batches, the same order
for every optimiser at a given seed).

Optimisers (:func:`make_step`):

* ``adam``: torch.optim.Adam, lr from ``ADAM_LRS``;
* ``sgd``: torch.optim.SGD, momentum 0.9, lr from ``SGD_LRS``;
* ``kfac``: natural gradient with our KFAC, ``fl.fisher(model, batch, likelihood, "kfac",
  fisher_type="mc")`` on the current batch every ``KFAC_EVERY`` steps,
  ``F.add_diagonal(damping).solve(g)`` (exact through the Kronecker factors), momentum 0.9;
* ``fishleg``: ``fl.FishLeg`` (settings in ``FISHLEG``; its auxiliary batches are a second
  shuffled stream of training batches).

:func:`run_lockstep` trains configurations one step of each in turn and records the full training
and test losses every ``EVAL_EVERY`` steps with the time spent in training steps so far.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

import fim_linops as fl

SIZES = (64, 256, 128, 64, 32, 8, 32, 64, 128, 256, 64)
BATCH = 100
AUX_BATCH = 100  # examples per auxiliary Fisher-vector product
N_TRAIN = 1500
EVAL_EVERY = 20
ADAM_LRS = (1e-3, 3e-3)
SGD_LRS = (0.02, 0.05)
KFAC_EVERY = 20
KFAC = dict(lr=0.05, damping=1.0, momentum=0.9)
#: tuned for the bounded KFAC init (0.3 / 1.0 were tuned for the former trace-split init; see
#: fishleg_results/README.md)
FISHLEG = dict(
    lr=0.05, damping=0.15, structure="kron", aux_lr=3e-3, update_aux_every=50, init="kfac",
    momentum=0.9, weight_decay=0.0,
)  # fmt: skip


class IndependentBernoulli(fl.Likelihood):
    r"""C independent Bernoulli pixels per example on logits f (N, C); targets in [0, 1].

    nll = sum_c BCE(f_c, y_c); H = diag(p (1 - p)), S = diag(sqrt(p (1 - p))) (N, C, C)."""

    name = "independent_bernoulli"

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(f, y, reduction="none").sum(-1)

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        p = torch.sigmoid(f.detach()).expand(n_samples, *f.shape)
        return torch.bernoulli(p, generator=generator)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        return torch.sigmoid(f.detach()) - y

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        p = torch.sigmoid(f.detach())
        return torch.diag_embed((p * (1 - p)).sqrt())

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        p = torch.sigmoid(f.detach())
        return p * (1 - p) * v


LIKELIHOOD = IndependentBernoulli()


def loss_fn(logits: Tensor, x: Tensor) -> Tensor:
    """Bernoulli nll summed over the 64 pixels, mean over examples."""
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def load_data() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    X = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    return X[:N_TRAIN], X[N_TRAIN:]


def make_model(seed: int) -> nn.Sequential:
    """The auto-encoder with the paper's initialisation: W ~ N(0, 1 / fan_in), b = 0.

    (PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), has a third of that variance: through
    ten layers the signal fades, every optimiser starts on the mean-image plateau (train 27.2) and
    Adam ends near 16.5 instead of the 15.5 of the issue's re-implementation.)"""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    n = len(SIZES) - 1
    for i in range(n):
        lin = nn.Linear(SIZES[i], SIZES[i + 1])
        nn.init.normal_(lin.weight, std=SIZES[i] ** -0.5)
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < n - 1 and SIZES[i + 1] != min(SIZES):  # linear code layer and output logits
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batches(X: Tensor, seed: int, size: int = BATCH):
    """Endless shuffled minibatches of X (epochs of len(X) // size batches)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X) - size + 1, size):
            yield X[perm[i : i + size]]


class AuxStream:
    """An endless iterable of (x, x) training batches for FishLeg's auxiliary Fisher products."""

    def __init__(self, X: Tensor, seed: int, size: int):
        self.X, self.seed, self.size = X, seed, size

    def __iter__(self):
        return ((x, x) for x in batches(self.X, self.seed, self.size))


# -- optimisers: each returns step(x) -> None --------------------------------------------------------
def make_step(name: str, model: nn.Module, X: Tensor, seed: int, cfg: dict):
    params = list(model.parameters())
    if name in ("adam", "sgd"):
        opt = (
            torch.optim.Adam(params, lr=cfg["lr"])
            if name == "adam"
            else torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9)
        )

        def step(x: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), x).backward()
            opt.step()

        return step
    if name == "fishleg":
        cfg = dict(cfg)
        aux = AuxStream(X, seed + 1000, cfg.pop("aux_batch", AUX_BATCH))
        opt = fl.FishLeg(model, LIKELIHOOD, aux, seed=seed, **cfg)

        def step(x: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), x).backward()
            opt.step()

        step.opt = opt  # type: ignore[attr-defined]
        return step
    if name == "kfac":
        state: dict = {"t": 0, "F": None, "buf": None}
        gen = torch.Generator().manual_seed(seed + 2000)

        def step(x: Tensor) -> None:
            if state["t"] % cfg.get("every", KFAC_EVERY) == 0:
                F = fl.fisher(
                    model, (x, x), likelihood=LIKELIHOOD, structure="kfac",
                    fisher_type=cfg.get("fisher_type", "mc"), generator=gen,
                )  # fmt: skip
                state["F"] = F.add_diagonal(torch.tensor(cfg["damping"]))
            state["t"] += 1
            for p in params:
                p.grad = None
            loss_fn(model(x), x).backward()
            with torch.no_grad():
                g = torch.cat([p.grad.reshape(-1) for p in params])
                d = state["F"].solve(g[:, None])[:, 0]
                buf = state["buf"]
                buf = d if buf is None else buf.mul_(cfg["momentum"]).add_(d)
                state["buf"] = buf
                i = 0
                for p in params:
                    p.sub_(cfg["lr"] * buf[i : i + p.numel()].view_as(p))
                    i += p.numel()

        return step
    raise ValueError(name)


@torch.no_grad()
def evaluate(model: nn.Module, Xtr: Tensor, Xte: Tensor) -> tuple[float, float]:
    return float(loss_fn(model(Xtr), Xtr)), float(loss_fn(model(Xte), Xte))


class Run:
    """One optimiser configuration training its own model on the seed's batch order."""

    def __init__(self, name: str, cfg: dict, seed: int, Xtr: Tensor, Xte: Tensor):
        self.name, self.cfg, self.Xtr, self.Xte = name, cfg, Xtr, Xte
        self.model = make_model(seed)
        self.data = batches(Xtr, seed)
        t0, c0 = time.perf_counter(), time.process_time()
        self.step = make_step(name, self.model, Xtr, seed, cfg)
        # FishLeg's KFAC initialisation counts
        self.elapsed, self.cpu = time.perf_counter() - t0, time.process_time() - c0
        self.rows: list[dict] = []
        self.done = False
        self.record(0)

    def record(self, t: int) -> None:
        tr, te = evaluate(self.model, self.Xtr, self.Xte)
        self.rows.append(dict(step=t, time_s=self.elapsed, cpu_s=self.cpu, train=tr, test=te))
        if not math.isfinite(tr) or tr > 1e3:  # diverged: stop (and avoid slow inf/NaN math)
            self.done = True

    def advance(self, t: int, steps: int) -> None:
        x = next(self.data)
        t0, c0 = time.perf_counter(), time.process_time()
        self.step(x)
        self.elapsed += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        if t % EVAL_EVERY == 0 or t == steps:
            self.record(t)


def run_lockstep(
    configs: list[tuple[str, dict]], seed: int, steps: int, Xtr: Tensor, Xte: Tensor
) -> list[list[dict]]:
    """Train every configuration for ``steps`` steps, one step of each in turn, so that all of
    them run under the same load of a shared machine; rows (step, time_s, cpu_s, train, test)
    every EVAL_EVERY steps, per configuration."""
    runs = [Run(name, cfg, seed, Xtr, Xte) for name, cfg in configs]
    for t in range(1, steps + 1):
        for r in runs:
            if not r.done:
                r.advance(t, steps)
    for r in runs:
        if r.name == "fishleg":
            r.rows[-1]["aux_skipped"] = int(r.step.opt.aux_skipped)  # type: ignore[attr-defined]
    return [r.rows for r in runs]
