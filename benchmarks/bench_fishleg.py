r"""FishLeg vs Adam, SGD with momentum and KFAC natural gradient on the deep auto-encoder (issue 7).

The task, the optimisers and the lockstep runner are in ``fishleg_ae.py`` (1,500 sklearn digits for
training, 297 for test, a 64-256-128-64-32-8-32-64-128-256-64 auto-encoder, Bernoulli nll summed
over pixels, batch 100); here ``torch.set_num_threads(1)``, CPU, float32. Adam and SGD run each
of their learning rates and keep the better final train loss.

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
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from fishleg_ae import (  # noqa: E402  (re-exported: notebooks/make_03.py reads them from here)
    ADAM_LRS,
    AUX_BATCH,
    BATCH,
    EVAL_EVERY,
    FISHLEG,
    KFAC,
    SGD_LRS,
    load_data,
    loss_fn,
    make_model,
    make_step,
    run_lockstep,
)

__all__ = ["FISHLEG", "KFAC", "SGD_LRS", "load_data", "run_lockstep"]

OUT = Path(__file__).parent / "fishleg_results"


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
