r"""FishLeg vs Adam, SGD with momentum and KFAC natural gradient on the deep auto-encoder (issue 7).

Task (the classic deep auto-encoder benchmark, at sklearn-digits scale): 1,500 digits for training,
the other 297 for test; pixels scaled to [0, 1] (x / 16); a 10-layer auto-encoder
64-256-128-64-32-8-32-64-128-256-64 (ReLU, linear 8-unit code, 64 output logits); loss = the
Bernoulli negative log-likelihood of the pixels summed over the 64 pixels, mean over examples
(binary cross-entropy with soft targets); batch 100 (epochs of shuffled batches, the same order
for every optimiser at a given seed); ``torch.set_num_threads(2)``, CPU, float32.

Optimisers:

* ``adam``: torch.optim.Adam, lr from {1e-3, 3e-3} (both run, the better final train loss kept);
* ``sgd``: torch.optim.SGD, momentum 0.9, lr from {0.02, 0.05} (the better kept);
* ``kfac``: natural gradient with our KFAC, ``fl.fisher(model, batch, likelihood, "kfac",
  fisher_type="mc")`` on the current batch every ``KFAC_EVERY`` steps,
  ``F.add_diagonal(damping).solve(g)`` (exact through the Kronecker factors), momentum 0.9;
* ``fishleg``: ``fl.FishLeg`` (settings in ``FISHLEG``; its auxiliary batches are a second
  shuffled stream of training batches).

Every ``EVAL_EVERY`` steps the full training and test losses are recorded, with the wall time
spent in training steps so far (evaluation excluded). Outputs in ``benchmarks/fishleg_results/``:
``curves.csv`` (optimiser, label, seed, step, time_s, train, test), ``summary.md`` (the table) and
``curves.png``.

    python benchmarks/bench_fishleg.py                      # 2000 steps, 3 seeds
    python benchmarks/bench_fishleg.py --steps 500 --seeds 1
    python benchmarks/bench_fishleg.py --profile            # where a FishLeg step's time goes

``--profile`` writes ``profile.md``: the median time of each part of a FishLeg step next to an Adam
step, on one batch of 100.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import fim_linops as fl

OUT = Path(__file__).parent / "fishleg_results"
SIZES = (64, 256, 128, 64, 32, 8, 32, 64, 128, 256, 64)
BATCH = 100
AUX_BATCH = 100  # examples per auxiliary Fisher-vector product
N_TRAIN = 1500
EVAL_EVERY = 20
ADAM_LRS = (1e-3, 3e-3)
SGD_LRS = (0.02, 0.05)
KFAC_EVERY = 20
KFAC = dict(lr=0.05, damping=1.0, momentum=0.9)
FISHLEG = dict(
    lr=0.3, damping=1.0, structure="kron", aux_lr=3e-3, update_aux_every=50, init="kfac",
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


# -- analysis ----------------------------------------------------------------------------------------
def mean_curve(rows: list[dict], key: str) -> dict[int, float]:
    by: dict[int, list[float]] = {}
    for r in rows:
        by.setdefault(r["step"], []).append(r[key])
    return {s: sum(v) / len(v) for s, v in sorted(by.items())}


def first_step_below(curve: dict[int, float], target: float) -> int | None:
    for s, v in curve.items():
        if v <= target:
            return s
    return None


def summarise(
    results: dict[str, list[dict]], steps: int, seeds: int, labels: dict[str, str]
) -> str:
    adam_train = mean_curve(results["adam"], "train")
    target = adam_train[max(adam_train)]
    adam_t, adam_c = mean_curve(results["adam"], "time_s"), mean_curve(results["adam"], "cpu_s")
    adam_wall, adam_cpu = adam_t[max(adam_t)] / max(adam_t), adam_c[max(adam_c)] / max(adam_c)
    lines = [
        f"Deep auto-encoder on digits, {steps} steps, batch {BATCH}, mean over {seeds} seed(s); "
        f"losses evaluated every {EVAL_EVERY} steps on the full train/test sets. Target = Adam's "
        f"final train loss {target:.2f}. Times: training steps only, 1 thread, all optimisers of "
        "a seed run in lockstep on a shared machine; CPU = process CPU time (insensitive to the "
        "other jobs), wall = elapsed time.",
        "",
        "| optimiser | final train | final test | step reaching Adam's final train | "
        "CPU s to it | wall s to it | CPU/step vs Adam | wall/step vs Adam |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        tr, te, ts, tc = (mean_curve(rows, k) for k in ("train", "test", "time_s", "cpu_s"))
        label = labels[name]
        n_div = diverged(rows, steps)
        if n_div:  # the means after its divergence are over the other seeds only
            label += f" **diverged on {n_div} of {seeds} seeds** (means over the others)"
        last = max(tr)
        hit = first_step_below(tr, target)
        hit_s = f"{hit} ({100 * hit / steps:.0f}%)" if hit is not None else "never"
        hit_c = f"{tc[hit]:.1f}" if hit is not None else "-"
        hit_t = f"{ts[hit]:.1f}" if hit is not None else "-"
        lines.append(
            f"| {label} | {tr[last]:.2f} | {te[last]:.2f} | {hit_s} | {hit_c} | {hit_t} | "
            f"{tc[last] / last / adam_cpu:.2f}x | {ts[last] / last / adam_wall:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, rows in results.items():
        tr, te, ts = (mean_curve(rows, k) for k in ("train", "test", "cpu_s"))
        (line,) = axes[0].plot(list(tr), list(tr.values()), label=labels[name])
        axes[0].plot(list(te), list(te.values()), ls="--", color=line.get_color())
        axes[1].plot(list(ts.values()), list(tr.values()), color=line.get_color())
        axes[2].plot(list(tr), list(ts.values()), color=line.get_color())
    axes[0].set(xlabel="step", ylabel="loss (train solid, test dashed)", yscale="log")
    axes[1].set(xlabel="CPU time of the training steps (s)", ylabel="train loss", yscale="log")
    axes[2].set(xlabel="step", ylabel="cumulative CPU time (s)")
    axes[0].legend()
    fig.suptitle("Deep auto-encoder on digits (Bernoulli nll summed over 64 pixels)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def read_csv(path: Path) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """The results and labels of a ``curves.csv`` written by :func:`write_csv`."""
    results: dict[str, list[dict]] = {}
    labels: dict[str, str] = {}
    with path.open() as f:
        for r in csv.DictReader(f):
            labels[r["optimiser"]] = r["label"]
            results.setdefault(r["optimiser"], []).append(
                dict(seed=int(r["seed"]), step=int(r["step"]), time_s=float(r["time_s"]),
                     cpu_s=float(r["cpu_s"]), train=float(r["train"]), test=float(r["test"]))
            )  # fmt: skip
    return results, labels


def write_csv(results: dict[str, list[dict]], labels: dict[str, str], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimiser", "label", "seed", "step", "time_s", "cpu_s", "train", "test"])
        for name, rows in results.items():
            for r in rows:
                w.writerow([name, labels[name], r["seed"], r["step"], f"{r['time_s']:.3f}", f"{r['cpu_s']:.3f}",
                            f"{r['train']:.3f}", f"{r['test']:.3f}"])  # fmt: skip


def diverged(rows: list[dict], steps: int) -> int:
    """Number of seeds that stopped before ``steps`` (non-finite or exploding loss)."""
    last: dict[int, int] = {}
    for r in rows:
        last[r["seed"]] = max(last.get(r["seed"], 0), r["step"])
    return sum(s < steps for s in last.values())


def final(rows: list[dict], steps: int) -> float:
    """Mean final train loss; inf if any seed diverged (a config is kept only if all seeds run)."""
    if diverged(rows, steps):
        return math.inf
    return mean_curve(rows, "train")[steps]


def profile(Xtr: Tensor, repeats: int = 100) -> str:
    """Median CPU times (ms) of the parts of a FishLeg step next to an Adam step, on one batch;
    the parts are timed in turn, round after round, so that all see the same machine load."""
    import statistics

    from fim_linops.fishleg.cached import apply_block

    x = Xtr[:BATCH]
    model = make_model(0)
    adam = make_step("adam", model, Xtr, 0, dict(lr=1e-3))
    fl_model = make_model(0)
    step = make_step("fishleg", fl_model, Xtr, 0, dict(FISHLEG, update_aux_every=10**9))
    opt = step.opt  # type: ignore[attr-defined]
    step(x)
    g = opt._gradient()
    group = opt.param_groups[0]
    aux_x = Xtr[:AUX_BATCH]

    def forward_backward() -> None:
        fl_model.zero_grad(set_to_none=True)
        loss_fn(fl_model(x), x).backward()

    def q_g() -> None:
        for spec, block, factors in zip(opt.specs, opt.layout.blocks, opt._cache, strict=True):
            apply_block(spec, factors, [e.param.grad for e in block.entries])

    def aux_step() -> None:
        opt._aux_step(group, g)
        step(x)  # forms the cached factors again, as the next step after an update does

    parts = {
        "adam": lambda: adam(x),
        "fb": forward_backward,
        "plain": lambda: step(x),
        "qg": q_g,
        "aux": aux_step,
        "fvp": lambda: opt._fvp(aux_x, g, group),
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for r in range(repeats + 5):
        for k, fn in parts.items():
            t0 = time.process_time()
            fn()
            if r >= 5:  # warm-up rounds
                times[k].append(1000 * (time.process_time() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    aux = med["aux"] - med["plain"]  # the auxiliary update alone
    k = FISHLEG["update_aux_every"]
    rows = [
        ("Adam step (forward + backward + torch.optim.Adam)", med["adam"]),
        ("forward + backward alone", med["fb"]),
        ("FishLeg step without auxiliary update", med["plain"]),
        ("  of which Q g (cached R^T R, L L^T: K U M per layer)", med["qg"]),
        ("FishLeg auxiliary update (one Adam step on lambda, factors formed again)", aux),
        (f"  of which (F + damping I) w, jvp + vjp on {AUX_BATCH} examples", med["fvp"]),
        (f"FishLeg step, auxiliary update every {k} steps (amortised)", med["plain"] + aux / k),
    ]
    lines = [
        f"Median CPU ms (process time, {repeats} interleaved rounds) on one batch of {BATCH}, "
        "torch.set_num_threads(1), on a machine shared with other jobs.",
        "",
        "| part | ms | vs Adam step |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {t:.2f} | {t / med['adam']:.2f}x |" for name, t in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="subset of adam sgd kfac fishleg")
    ap.add_argument("--profile", action="store_true", help="time the parts of a FishLeg step")
    ap.add_argument(
        "--from-csv", action="store_true", help="rewrite summary.md and curves.png from curves.csv"
    )
    args = ap.parse_args()
    if args.from_csv:
        results, labels = read_csv(OUT / "curves.csv")
        steps = max(r["step"] for rows in results.values() for r in rows)
        seeds = len({r["seed"] for rows in results.values() for r in rows})
        plot(results, labels, OUT / "curves.png")
        table = summarise(results, steps, seeds, labels)
        (OUT / "summary.md").write_text(table)
        print(table)
        return
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only wait on each other
    torch.set_flush_denormal(True)
    Xtr, Xte = load_data()
    OUT.mkdir(exist_ok=True)
    if args.profile:
        table = profile(Xtr)
        (OUT / "profile.md").write_text(table)
        print(table)
        return
    names = args.only or ["adam", "sgd", "kfac", "fishleg"]
    grid = {
        "adam": [dict(lr=lr) for lr in ADAM_LRS],
        "sgd": [dict(lr=lr) for lr in SGD_LRS],
        "kfac": [KFAC],
        "fishleg": [FISHLEG],
    }
    configs = [(name, cfg) for name in names for cfg in grid[name]]
    # warm-up (first-call costs of torch.optim, torch.func, linear_operator)
    run_lockstep(configs, 99, 2 * EVAL_EVERY, Xtr, Xte)
    per_config: list[list[dict]] = [[] for _ in configs]
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        for rows, new in zip(
            per_config, run_lockstep(configs, seed, args.steps, Xtr, Xte), strict=True
        ):
            rows += [dict(x, seed=seed) for x in new]
        print(f"seed {seed} ({time.perf_counter() - t0:.0f} s):", flush=True)
        for (name, cfg), rows in zip(configs, per_config, strict=True):
            last = rows[-1]
            print(f"  {name} {cfg}: train {last['train']:.3f} test {last['test']:.3f} "
                  f"at step {last['step']} ({last['time_s']:.1f} s)", flush=True)  # fmt: skip
    results: dict[str, list[dict]] = {}
    labels: dict[str, str] = {}
    for name in names:
        best = min(
            ((cfg, rows) for (n, cfg), rows in zip(configs, per_config, strict=True) if n == name),
            key=lambda cr: final(cr[1], args.steps),
        )
        results[name] = best[1]
        cfg = best[0]
        if name == "adam":
            labels[name] = f"Adam (lr {cfg['lr']:g})"
        elif name == "sgd":
            labels[name] = f"SGD+momentum (lr {cfg['lr']:g})"
        elif name == "kfac":
            labels[name] = f"KFAC NG (lr {cfg['lr']:g}, damping {cfg['damping']:g})"
        else:
            labels[name] = (
                f"FishLeg ({cfg['structure']}, lr {cfg['lr']:g}, damping {cfg['damping']:g}, "
                f"aux_lr {cfg['aux_lr']:g}, aux every {cfg['update_aux_every']})"
            )
    write_csv(results, labels, OUT / "curves.csv")
    plot(results, labels, OUT / "curves.png")
    if "adam" in results:
        table = summarise(results, args.steps, args.seeds, labels)
        (OUT / "summary.md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
