"""Computing a Fisher leaves the model exactly as found: parameters, buffers, .grad, train/eval
mode, hooks, also when an exception flies mid-loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fim_linops as fl

STRUCTURES = ["dense", "block_diag", "diag", "kfac", "implicit"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "modes": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def _assert_same(model: nn.Module, snap: dict) -> None:
    now = _snapshot(model)
    for n, p in snap["params"].items():
        assert torch.equal(now["params"][n], p), n
    for n, b in snap["buffers"].items():
        assert torch.equal(now["buffers"][n], b), n
    for n, g in snap["grads"].items():
        if g is None:
            assert now["grads"][n] is None, n
        else:
            assert torch.equal(now["grads"][n], g), n
    assert now["modes"] == snap["modes"]
    assert now["hooks"] == snap["hooks"]


@pytest.mark.parametrize("structure", STRUCTURES)
def test_model_is_left_as_found_after_success(structure: str) -> None:
    model = _model()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    model(x).sum().backward()  # existing .grad must survive
    model.train()
    snap = _snapshot(model)
    F = fl.fisher(
        model,
        (x, y),
        structure=structure,
        fisher_type="mc",
        generator=torch.Generator().manual_seed(1),
    )
    F @ torch.randn(F.shape[-1])
    _assert_same(model, snap)


#: an input value that only the third batch holds
SENTINEL = 1234.0


class RaisesOnThirdBatch(nn.Module):
    """Raises on the batch that holds SENTINEL (the third), whatever other forwards run."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == SENTINEL).any()):
            raise RuntimeError("boom on the third batch")
        return self.net(x)


@pytest.mark.parametrize("structure", STRUCTURES[:-1])
def test_model_is_left_as_found_when_the_third_batch_raises(structure: str) -> None:
    model = RaisesOnThirdBatch()
    model.eval()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    model.net(x).sum().backward()
    snap = _snapshot(model.net)
    x[8, 0] = SENTINEL
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    with pytest.raises(RuntimeError, match="third batch"):
        fl.fisher(model, batches, structure=structure)
    _assert_same(model.net, snap)
    assert [m.training for m in model.modules()] == [False] * len(list(model.modules()))


def test_generator_makes_mc_results_identical_and_leaves_global_rng_alone() -> None:
    model = _model()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    state = torch.get_rng_state()
    d1 = fl.fisher(
        model,
        (x, y),
        structure="diag",
        fisher_type="mc",
        generator=torch.Generator().manual_seed(3),
    )
    d2 = fl.fisher(
        model,
        (x, y),
        structure="diag",
        fisher_type="mc",
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(d1.diagonal(), d2.diagonal())
    assert torch.equal(torch.get_rng_state(), state)


def test_dtype_argument_computes_on_a_copy() -> None:
    model = _model()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    F = fl.fisher(model, (x, y), structure="diag", dtype=torch.float64)
    assert F.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_parameters_and_buffers_rewritten_by_the_forward_are_restored() -> None:
    """An Embedding with max_norm renormalises its rows in place on every forward; a module may
    update a buffer in its forward. fl.fisher puts both back; a parameter rewritten in place that
    it cannot restore is named in a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4, max_norm=0.5), nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        model[0].weight.mul_(3)  # rows well above max_norm
    weight = model[0].weight.detach().clone()
    x, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 3, (5,))
    for structure in ("diag", "dense", "implicit"):
        fl.fisher(model, (x, y), structure=structure).diagonal()
        assert torch.equal(model[0].weight, weight)

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.lin(x)

    counting = Counting()
    for structure in ("diag", "kfac"):
        fl.fisher(counting, (torch.randn(4, 3), torch.randint(0, 3, (4,))), structure=structure)
        assert counting.calls.item() == 0

    class Decaying(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.lin.weight.mul_(0.5)  # a forward that rewrites a parameter in place
            return self.lin(x)

    with pytest.warns(RuntimeWarning, match="'lin.weight' in place"):
        fl.fisher(Decaying(), (torch.randn(4, 3), torch.randint(0, 3, (4,))), structure="diag")
