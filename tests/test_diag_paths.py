"""The diagonal's fast paths (squares summed over columns, accumulation straight into the total)
against the dense Fisher's diagonal with the same sampled columns, for few and many columns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fim_linops as fl
from fim_linops.engine.rules.base import column_square_sum


@pytest.mark.parametrize("k", [1, 9, 40])
def test_column_square_sum(k: int) -> None:
    g = torch.randn(k, 7, 5, dtype=torch.float64)
    assert torch.allclose(column_square_sum(g), (g**2).sum(0), atol=1e-12)


class _Tokens(nn.Module):
    """Embedding (one or several tokens per example) -> Linear over positions -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.mix = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(t))).mean(1))


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize(("fisher_type", "mc_samples"), [("exact", 1), ("mc", 1), ("mc", 40)])
def test_diag_equals_the_dense_diagonal(tokens: int, fisher_type: str, mc_samples: int) -> None:
    torch.manual_seed(0)
    model = _Tokens().double()
    x, y = torch.randint(0, 11, (10, tokens)), torch.randint(0, 3, (10,))
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    kw = {"fisher_type": fisher_type, "mc_samples": mc_samples}
    d = fl.fisher(model, data, structure="diag", generator=torch.Generator().manual_seed(1), **kw)
    ref = fl.fisher(
        model, data, structure="dense", generator=torch.Generator().manual_seed(1), **kw
    )
    assert torch.allclose(d.diagonal(), ref.to_dense().diagonal(), rtol=1e-10, atol=1e-14)
