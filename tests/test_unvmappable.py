"""Models whose per-example gradients torch.func cannot vmap over the examples with shared
parameters: recurrent layers (nn.LSTM, nn.GRU, nn.RNN: their backward accumulates weight gradients
in place into unbatched buffers) and nn.PReLU (its batching rule mis-broadcasts). The engine then
vmaps with per-example parameter copies (recurrent layers) or, failing that, loops over the
examples (PReLU, with a warning). Compared with a float64 reference by plain autograd, one backward
per example and output (torch.func's own jacrev fails on these modules)."""

from __future__ import annotations

import warnings

import pytest
import torch
from reference import (
    assert_matches,
    exact_fisher,
    per_example_jacobians,
)
from torch import nn

import fim_linops as fl

N = 5


pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


class Recurrent(nn.Module):
    """Linear (ruled, before the recurrence: its columns go back through the recurrent backward)
    -> recurrent layer (torch.func) -> Linear on the last step."""

    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 3)
        self.rec = kind(3, 4, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rec(self.inp(x))[0][:, -1])


def _prelu() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.PReLU(5), nn.Linear(5, 2), nn.PReLU(), nn.Linear(2, 3))


CASES = {
    "lstm": (lambda: Recurrent(nn.LSTM), (N, 4, 3)),
    "gru": (lambda: Recurrent(nn.GRU), (N, 4, 3)),
    "rnn": (lambda: Recurrent(nn.RNN), (N, 4, 3)),
    "prelu": (_prelu, (N, 4)),
}


def _case(name: str):
    make, shape = CASES[name]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(*shape)
    y = torch.randint(0, 3, (N,))
    return model, x, y


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("structure", ["dense", "diag", "block_diag", "implicit"])
def test_exact_fisher_matches_autograd_loop(name: str, structure: str) -> None:
    model, x, y = _case(name)
    ref = exact_fisher(model, x, "categorical", loop=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # PReLU's loop warning: tested below
        F = fl.fisher(model, (x, y), structure=structure)
        assert_matches(F, ref, model, structure)
        v = torch.randn(ref.shape[0], 2)
        torch.testing.assert_close(F @ v, F.to_dense() @ v, rtol=1e-10, atol=1e-12)
    assert torch.linalg.matrix_norm(ref) > 0


@pytest.mark.parametrize("name", ["lstm", "prelu"])
def test_empirical_fisher_matches_autograd_loop(name: str) -> None:
    model, x, y = _case(name)
    jac = per_example_jacobians(model, x, loop=True)  # (N, C, P)
    f = model(x).detach()
    g = torch.softmax(f, -1) - nn.functional.one_hot(y, 3)  # d nll / d f, (N, C)
    grads = torch.einsum("ncp,nc->np", jac, g)
    ref = grads.T @ grads / N
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        F = fl.fisher(model, (x, y), structure="dense", fisher_type="empirical")
    torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_recurrent_layers_stay_vectorised_prelu_warns_once() -> None:
    model, x, y = _case("lstm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no slow-path warning for recurrent layers
        fl.fisher(model, [(x[:3], y[:3]), (x[3:], y[3:])], structure="diag")
    model, x, y = _case("prelu")
    with pytest.warns(RuntimeWarning, match="one example at a time") as record:
        fl.fisher(model, [(x[:3], y[:3]), (x[3:], y[3:])], structure="diag")
    loops = [w for w in record if "one example at a time" in str(w.message)]
    assert len(loops) == 1  # the strategy is kept for the next batch
    assert "'1'" in str(loops[0].message) and "'3'" in str(loops[0].message)  # the PReLU modules


def test_model_left_as_found_after_the_fallbacks() -> None:
    model, x, y = _case("prelu")
    model.train()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fl.fisher(model, (x, y), structure="diag")
    assert model.training
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
