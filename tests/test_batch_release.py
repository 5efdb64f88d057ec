"""Every build holds one batch's results at a time.

The engine makes batch b's results only after its consumer let go of batch b - 1's: each wrapper
and loop between the engine and the statistics must drop its reference before asking for the
next batch. A wrapper that keeps one (a generator whose loop variable outlives its ``yield``)
doubles the peak memory of a build without changing any number: this is what made plain
``structure="kfac"`` on a ResNet peak at 9.5 GB against 5.6 GB for the same build as an explicit mix.
The check: at the creation of each batch's first result, no result of an earlier batch is alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import models
import pytest
import torch
from torch import nn

import fim_linops as fl
from fim_linops.engine import engine as engine_module
from fim_linops.engine.result import BatchResult


class _Tracker:
    """Counts the engine's results alive from batches before the current one."""

    def __init__(self) -> None:
        self.alive: list[tuple[int, weakref.ref]] = []
        self.batch = -1
        self.worst = 0
        self.made = 0

    def made_one(self, res: BatchResult) -> None:
        if res.first:
            self.batch += 1
            old = [r for b, r in self.alive if b < self.batch and r() is not None]
            self.worst = max(self.worst, len(old))
        self.alive.append((self.batch, weakref.ref(res)))
        self.made += 1


@pytest.fixture
def tracker(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Tracker]:
    t = _Tracker()

    class Tracked(BatchResult):
        def __post_init__(self) -> None:
            super().__post_init__()
            t.made_one(self)

    monkeypatch.setattr(engine_module, "BatchResult", Tracked)
    yield t


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 2) -> list:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


CASES = [
    ("kfac", "exact", {}),  # norm layers: the kfac-everywhere build
    ("kfac", "mc", {}),
    ("ekfac", "exact", {}),
    ("ekfac", "mc", {}),
    ("kron_sum", "exact", {"rank": 2}),
    ("diag", "exact", {}),
    ("block_diag", "mc", {}),
    ("dense", "exact", {}),
    ("quasi_diag", "exact", {}),
    ("lowrank", "exact", {"rank": 3}),
    ({nn.Linear: "kfac", "default": "diag"}, "exact", {}),
    ({nn.Linear: "ekfac", "default": "block_diag"}, "mc", {}),
]


@pytest.mark.parametrize(("structure", "fisher_type", "kwargs"), CASES, ids=str)
def test_a_build_holds_one_batch_at_a_time(
    tracker: _Tracker, structure: object, fisher_type: str, kwargs: dict
) -> None:
    model, x, y = models.norm_model()
    gen = torch.Generator().manual_seed(0)
    fl.fisher(
        model,
        _batches(x, y),
        structure=structure,  # type: ignore[arg-type]
        fisher_type=fisher_type,
        generator=gen,
        **kwargs,
    )
    assert tracker.batch >= 3, "the build made fewer batches than the data has"
    assert tracker.worst == 0, f"{tracker.worst} results of an earlier batch were alive"


def test_influence_gradients_hold_one_batch_at_a_time(tracker: _Tracker) -> None:
    model, x, y = models.mlp()
    fl.influence(model, _batches(x, y), _batches(x[:4], y[:4]), structure="diag")
    assert tracker.batch >= 3
    assert tracker.worst == 0, f"{tracker.worst} results of an earlier batch were alive"


def test_the_tracker_sees_a_consumer_that_keeps_its_batches(tracker: _Tracker) -> None:
    """The check itself: a consumer that keeps every result is caught."""
    from fim_linops.engine import Engine
    from fim_linops.layout import ParamLayout
    from fim_linops.likelihoods import get_likelihood

    model, x, y = models.mlp()
    engine = Engine(model, ParamLayout.from_model(model), get_likelihood("categorical"))
    kept = list(engine.run(_batches(x, y)))
    assert len(kept) == 4 and tracker.worst == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: fl.ntk(m, x, structure="dense", batch_size=2).to_dense(),
        lambda m, x: fl.ntk(m, x, x[:4], structure="dense", batch_size=2).to_dense(),
        lambda m, x: fl.jacobian(m, x, batch_size=2).to_dense(),
        lambda m, x: fl.laplace.Laplace(
            m, (x, torch.zeros(len(x), dtype=torch.long)), structure="kfac", batch_size=2
        ).predictive(x),
        lambda m, x: fl.laplace.Laplace(
            m, (x, torch.zeros(len(x), dtype=torch.long)), structure="diag", batch_size=2
        ).predictive(x, joint=True),
    ],
    ids=["ntk", "ntk_cross", "jacobian", "laplace_kfac", "laplace_diag_joint"],
)
def test_function_space_paths_hold_one_batch_at_a_time(tracker: _Tracker, call: object) -> None:
    model, x, _ = models.mlp()
    call(model, x)  # type: ignore[operator]
    assert tracker.batch >= 3
    assert tracker.worst == 0, f"{tracker.worst} results of an earlier batch were alive"
