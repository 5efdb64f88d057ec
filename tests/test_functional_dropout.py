"""Functional dropout (F.dropout in a forward, attention with dropout_p > 0) cannot be seen from
outside the model: the transformed forwards warn when it draws masks, and say nothing in eval
mode, with p = 0, or when the entry point already named active dropout modules."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fim_linops as fl

N = 4


class FunctionalDropout(nn.Module):
    def __init__(self, p: float = 0.2, attention: bool = False) -> None:
        super().__init__()
        self.lin, self.out, self.p, self.attention = nn.Linear(3, 4), nn.Linear(4, 2), p, attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        if self.attention:  # (N, 4) as one head over 4 positions of width 1
            q = h[:, None, :, None]
            p = self.p if self.training else 0.0
            h = F.scaled_dot_product_attention(q, q, q, dropout_p=p)[:, 0, :, 0]
        else:
            h = F.dropout(h, self.p, self.training)
        return self.out(h)


def _products(model: nn.Module) -> None:
    """An implicit Fisher product (one column: dual numbers) and Jacobian products (vmap over
    the vectors, where torch refuses random draws: a ValueError that says what to do)."""
    x, y = torch.randn(N, 3), torch.randint(0, 2, (N,))
    F_ = fl.fisher(model, (x, y), structure="implicit")
    F_ @ torch.randn(F_.shape[0])
    v = torch.randn(F_.shape[0], 2)
    if model.training and model.p > 0:
        with pytest.raises(ValueError, match="draws random numbers.*model.eval"):
            fl.jacobian(model, x) @ v
    else:
        fl.jacobian(model, x) @ v


@pytest.mark.parametrize("attention", [False, True])
def test_functional_dropout_in_training_mode_warns(attention: bool) -> None:
    torch.manual_seed(0)
    match = "scaled_dot_product_attention" if attention else r"dropout\(p=0.2, training=True\)"
    with pytest.warns(UserWarning, match=match + ".*random sub-networks"):
        _products(FunctionalDropout(attention=attention).train())


@pytest.mark.parametrize("model", [FunctionalDropout().eval(), FunctionalDropout(p=0.0).train()])
def test_no_functional_dropout_warning_in_eval_mode_or_with_p_zero(model: nn.Module) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*random sub-networks")
        _products(model)


def test_dropout_modules_are_named_once_not_again_per_call() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Linear(4, 2)).train()
    x, y = torch.randn(N, 3), torch.randint(0, 2, (N,))
    with pytest.warns(UserWarning, match="dropout active") as record:
        F_ = fl.fisher(model, (x, y), structure="implicit")
        F_ @ torch.randn(F_.shape[0])
    assert not any("random sub-networks" in str(w.message) and "calls" in str(w.message)
                   for w in record)  # fmt: skip
