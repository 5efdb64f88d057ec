"""Activation checkpointing (torch.utils.checkpoint). Non-reentrant: the engine's layer rules
work through it (the block's calls are in the graph) and match the model without checkpointing;
the implicit operator and the torch.func paths cannot (forward-mode AD and torch.func do not
support saved tensor hooks), and say so. Reentrant: the block's parameters are invisible to the
autograd graph, a clear error everywhere (was a silently wrong Fisher)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fim_linops as fl

N = 6


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 3)
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.reentrant = reentrant  # None: no checkpointing

    def block(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.b(torch.tanh(self.a(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.reentrant is None:
            return self.out(self.block(h))
        return self.out(checkpoint(self.block, h, use_reentrant=self.reentrant))


def _pair(reentrant: bool):
    torch.manual_seed(0)
    plain = Checkpointed(None)
    model = Checkpointed(reentrant)
    model.load_state_dict(plain.state_dict())
    x, y = torch.randn(N, 3), torch.randint(0, 3, (N,))
    return model, plain, x, y


@pytest.mark.parametrize("structure", ["dense", "block_diag", "diag", "kfac"])
def test_non_reentrant_checkpoint_matches_the_plain_model(structure: str) -> None:
    model, plain, x, y = _pair(reentrant=False)
    got = fl.fisher(model, (x, y), structure=structure).to_dense()
    want = fl.fisher(plain, (x, y), structure=structure).to_dense()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(fl.ntk(model, x).to_dense(), fl.ntk(plain, x).to_dense())


def test_non_reentrant_checkpoint_implicit_says_what_to_do() -> None:
    model, _, x, y = _pair(reentrant=False)
    F = fl.fisher(model, (x, y), structure="implicit")
    for use in (lambda: F @ torch.randn(F.shape[0]), lambda: F.diagonal()):
        with pytest.raises(ValueError, match="checkpoint.*structure='dense'"):
            use()


@pytest.mark.parametrize("structure", ["dense", "diag", "kfac"])
def test_reentrant_checkpoint_is_a_clear_error(structure: str) -> None:
    model, _, x, y = _pair(reentrant=True)
    with pytest.raises(ValueError, match="use_reentrant=True.*use_reentrant=False"):
        fl.fisher(model, (x, y), structure=structure)
    with pytest.raises(ValueError, match="use_reentrant=True"):
        fl.ntk(model, x).to_dense()
