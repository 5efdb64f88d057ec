"""Report section: a short FishLeg run against Adam on the digits task, with loss curves."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor, nn

from fim_linops.fishleg import FishLeg
from fim_linops.report.section import Section, figure_axes, save_figure
from fim_linops.report.task import DigitsTask, digits_cnn

#: FishLeg's settings in the report (KFAC start, an auxiliary Adam step every 2 steps)
FISHLEG_SETTINGS = "lr=0.3, damping=0.1, aux_lr=1e-3, update_aux_every=2, init='kfac'"
ADAM_LR = 3e-3


def _optimizer(name: str, model: nn.Module, task: DigitsTask) -> torch.optim.Optimizer:
    if name == "FishLeg":
        return FishLeg(
            model,
            "categorical",
            task.batches,
            lr=0.3,
            damping=0.1,
            aux_lr=1e-3,
            update_aux_every=2,
            init="kfac",
            seed=task.seed,
        )
    return torch.optim.Adam(model.parameters(), lr=ADAM_LR)


def _run(
    name: str, task: DigitsTask, steps: int, batch: int, every: int
) -> tuple[list[int], list[float], float]:
    """Train a fresh CNN (seeded like the task's) with ``name`` for ``steps`` minibatch steps;
    returns the steps at which the full-data loss was evaluated, those losses, and the seconds."""
    torch.manual_seed(task.seed)
    model = digits_cnn()
    opt = _optimizer(name, model, task)
    gen = torch.Generator().manual_seed(task.seed + 1)
    idx = torch.randint(0, task.x.shape[0], (steps, batch), generator=gen)  # same batches for both
    at: list[int] = []
    losses: list[Tensor] = []
    seconds = 0.0
    for t in range(steps + 1):
        if t % every == 0 or t == steps:
            with torch.no_grad():
                losses.append(nn.functional.cross_entropy(model(task.x), task.y))
            at.append(t)
        if t == steps:
            break
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(task.x[idx[t]]), task.y[idx[t]]).backward()
        opt.step()
        seconds += time.perf_counter() - t0
    return at, torch.stack(losses).tolist(), seconds


def fishleg_section(task: DigitsTask, out: Path, steps: int, batch: int = 64) -> Section:
    """FishLeg and Adam from the same initialisation on the same ``steps`` minibatches of
    ``batch`` digits; the loss over all 1,797 digits every ``max(1, steps // 20)`` steps.

    FishLeg's auxiliary data are the Fisher batches of the task (its learned Q approximates
    (F + damping I)^-1 of those examples); one exact Fisher-vector product per auxiliary step.
    """
    every = max(1, steps // 20)
    curves = {name: _run(name, task, steps, batch, every) for name in ("FishLeg", "Adam")}
    fig, ax = figure_axes()
    for name, (at, losses, _) in curves.items():
        ax.plot(at, losses, "o-", markersize=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (all digits)")
    ax.set_title(f"FishLeg vs Adam, batches of {batch}")
    ax.legend()
    image = save_figure(fig, out, "fishleg.png")
    lines = ["| optimiser | final loss | seconds | settings |", "|---|---:|---:|---|"]
    settings = {"FishLeg": FISHLEG_SETTINGS, "Adam": f"lr={ADAM_LR}"}
    for name, (_, losses, seconds) in curves.items():
        lines.append(f"| {name} | {losses[-1]:.4g} | {seconds:.2f} | {settings[name]} |")
    body = "\n".join(
        [
            f"{steps} steps of each optimiser from the same initialisation on the same minibatches "
            "(cross-entropy over all digits shown). Seconds: time in the optimisation steps.",
            "",
            *lines,
            "",
            f"![FishLeg vs Adam]({image})",
        ]
    )
    results = {
        name: {"steps": at, "loss": losses, "seconds": seconds}
        for name, (at, losses, seconds) in curves.items()
    }
    return Section("FishLeg vs Adam", body, [image], results)
