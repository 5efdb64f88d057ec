r"""How fast FishLeg's Q(lambda) learns (F + damping I)^-1 under each preset (issue 16, item 3).

Three models, every configuration from the same seed:

* ``linear-gaussian``: one nn.Linear(8, 4) (bias) under a unit-variance Gaussian likelihood on 512
  correlated inputs, 8 auxiliary batches of 64 (one epoch = 8 steps, lr = 0: only Q learns). Its
  Fisher is I kron A exactly (A = 1/N [X 1]^T [X 1], G = I), so F_gamma^-1 is a ``kron`` Q. Row:
  the relative error |Q F_gamma - I|_F / |I|_F at start and after 100 and 1,000 epochs.
* ``digits-mlp``: Linear 64-32-10 with tanh, categorical, 1,024 sklearn digits in 8 batches of 128
  (the auxiliary batches), 150 training steps of 64 random examples. Rows: the same relative error
  against the dense float64 GGN of the 1,024 examples (Q is block-diagonal over the two layers,
  so it cannot reach 0), at start and at the end, and the final training loss.
* ``auto-encoder``: the deep auto-encoder of ``bench_fishleg.py`` (its model, data, likelihood
  and batch order), ``--ae-steps`` steps (500), one seed: final train / test loss.

    python benchmarks/bench_fishleg_defaults.py              # all three, ~ a few minutes
    python benchmarks/bench_fishleg_defaults.py --only linear-gaussian

Configurations: ``reference`` (``preset="reference"``), ``default`` (the defaults), and the
default with Q = I at start (``init="scale"``), which shows that lambda itself learns.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import fim_linops as fl

sys.path.insert(0, str(Path(__file__).parent))
import fishleg_ae as ae  # noqa: E402

DT = torch.float64
CONFIGS = {
    "reference": dict(preset="reference"),
    "default": dict(),
    "default, init=scale": dict(init="scale"),
}


def rel_error(opt: fl.FishLeg, Fg: Tensor) -> float:
    """|Q F_gamma - I|_F / |I|_F with Q = opt.inverse_fisher, dense."""
    eye = torch.eye(Fg.shape[0], dtype=Fg.dtype)
    q = opt.inverse_fisher.to_dense().to(Fg.dtype)
    return float(torch.linalg.norm(q @ Fg - eye) / torch.linalg.norm(eye))


def dense_ggn(model: nn.Module, likelihood: fl.Likelihood, x: Tensor) -> Tensor:
    """1/N sum_n J_n^T H_n J_n in float64 (public parameter order), by jacrev."""
    model = model.double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = x.double()

    def f(p: dict) -> Tensor:
        return functional_call(model, p, (x,))

    out = f(params)
    n, c = out.shape
    jac = jacrev(f)(params)
    J = torch.cat([jac[k].reshape(n, c, -1) for k in params], -1)  # n: example, c: output
    s = likelihood.hessian_sqrt(out)  # (N, C, K)
    SJ = torch.einsum("nck,ncp->nkp", s, J)  # k: column of the Hessian root, p: parameter
    return torch.einsum("nkp,nkq->pq", SJ, SJ) / n


def linear_gaussian(cfg: dict, epochs: tuple[int, ...] = (100, 1000)) -> list[str]:
    g = torch.Generator().manual_seed(0)
    n, i, o = 512, 8, 4
    x = torch.randn(n, i, generator=g, dtype=DT) @ torch.randn(i, i, generator=g, dtype=DT)
    x = 0.5 * x + 0.3
    y = torch.randn(n, o, generator=g, dtype=DT)
    torch.manual_seed(1)
    model = nn.Linear(i, o).double()
    aux = [(x[k : k + 64], y[k : k + 64]) for k in range(0, n, 64)]
    opt = fl.FishLeg(model, fl.Gaussian(), aux, lr=0.0, seed=0, **cfg)
    damping = opt.param_groups[0]["damping"]
    Fg = dense_ggn(model, fl.Gaussian(), x) + damping * torch.eye(o * (i + 1), dtype=DT)
    out = [f"{rel_error(opt, Fg):.3g}"]
    t = 0
    for e in epochs:
        for _ in range((e - t) * len(aux)):
            opt.zero_grad()
            idx = torch.randint(0, n, (64,), generator=g)
            nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
        t = e
        out.append(f"{rel_error(opt, Fg):.3g}")
    return out


def digits_mlp(cfg: dict, steps: int = 150) -> list[str]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    aux = [(X[i : i + 128], y[i : i + 128]) for i in range(0, 1024, 128)]
    opt = fl.FishLeg(model, "categorical", aux, seed=0, **cfg)
    lik = fl.get_likelihood("categorical")

    def err() -> float:
        F = dense_ggn(_copy(model), lik, X[:1024])
        return rel_error(opt, F + opt.param_groups[0]["damping"] * torch.eye(len(F), dtype=DT))

    start = err()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(X), y))
    return [f"{start:.3g}", f"{err():.3g}", f"{loss:.3g}"]


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def auto_encoder(cfg: dict, steps: int) -> list[str]:
    Xtr, Xte = ae.load_data()
    run = ae.Run("fishleg", cfg, 0, Xtr, Xte)
    t0 = time.perf_counter()
    for t in range(1, steps + 1):
        run.advance(t, steps)
        if run.done:
            return ["diverged", "-", f"{time.perf_counter() - t0:.0f}"]
    last = run.rows[-1]
    return [f"{last['train']:.2f}", f"{last['test']:.2f}", f"{time.perf_counter() - t0:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=["linear-gaussian", "digits-mlp", "auto-encoder"])
    ap.add_argument("--ae-steps", type=int, default=500)
    ap.add_argument("--epochs", type=int, nargs=2, default=[100, 1000])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(2)
    tables = {
        "linear-gaussian": (
            f"| configuration | error at start | after {args.epochs[0]} epochs | after "
            f"{args.epochs[1]} epochs |",
            lambda c: linear_gaussian(c, tuple(args.epochs)),
        ),
        "digits-mlp": (
            "| configuration | error at start | after 150 steps | final train loss |",
            lambda c: digits_mlp(c),
        ),
        "auto-encoder": (
            f"| configuration | train after {args.ae_steps} steps | test | wall s |",
            lambda c: auto_encoder(c, args.ae_steps),
        ),
    }
    for name in args.only:
        header, fn = tables[name]
        print(f"\n{name}\n\n{header}\n|---|---|---|---|", flush=True)
        for label in args.configs:
            print(f"| {label} | " + " | ".join(fn(CONFIGS[label])) + " |", flush=True)


if __name__ == "__main__":
    main()
