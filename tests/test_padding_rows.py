"""Embedding ``padding_idx`` in the forward-mode paths, against float64 torch.func references.

F.embedding gives the padding row no gradient; forward mode would carry its tangent. A weight
tied to an output layer does have a gradient at that row through the layer, so zeroing the row's
tangent (the old fix) was wrong there: Gemma, OPT and BERT's masked-LM head tie a padded
embedding to the head. Every path built on jvp (implicit products, fl.jacobian, the NTK, the
Laplace predictives, FishLeg's products) is checked on a tied head, a scaled subclass, a
functional lookup and an untied embedding, with padding ids in the batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import exact_fisher, per_example_jacobians
from torch import nn

import fim_linops as fl
from fim_linops.fishleg import fisher_vector_product
from fim_linops.likelihoods import get_likelihood

pytestmark = pytest.mark.usefixtures("float64_default")
V, D, N, T = 7, 4, 4, 3


class TiedHead(nn.Module):
    """Token embedding with padding_idx 0, its weight tied to the output layer."""

    def __init__(self, emb: nn.Embedding | None = None) -> None:
        super().__init__()
        self.emb = emb if emb is not None else nn.Embedding(V, D, padding_idx=0)
        self.lin = nn.Linear(D, D)
        self.out = nn.Linear(D, V, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(self.emb(x))).mean(1))


class ScaledEmbedding(nn.Embedding):
    """A subclass with its own forward (Hugging Face's scaled word embeddings)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.5


class Functional(nn.Module):
    """A raw weight looked up with F.embedding(padding_idx=-1) and used again as the head."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(V, D))
        self.b = nn.Parameter(torch.randn(V))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.embedding(x, self.w, padding_idx=-1)).mean(1)  # (N, D)
        return h @ self.w.T + self.b


class Untied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.out = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)).mean(1))


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = {
        "tied": TiedHead,
        "scaled": lambda: TiedHead(ScaledEmbedding(V, D, padding_idx=0)),
        "functional": Functional,
        "untied": Untied,
    }[name]()
    x = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(1))
    x[0, 0], x[1, 2], x[2, 1] = 0, V - 1, 0  # padding ids 0 (and V - 1 for the functional one)
    return model, x


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


MODELS = ["tied", "scaled", "functional", "untied"]


@pytest.mark.parametrize("name", MODELS)
def test_implicit_products_equal_the_reverse_mode_reference(name):
    model, x = build(name)
    ref = exact_fisher(model, x, "categorical")
    v = torch.randn(ref.shape[0], 2, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(N, dtype=torch.long)  # not read by the exact Fisher
    F_ = fl.fisher(model, [(x, y)], "categorical", structure="implicit")
    close(F_ @ v[:, :1], ref @ v[:, :1])  # one column: forward-mode dual numbers
    close(F_ @ v, ref @ v)  # several columns: jvp under vmap
    close(fl.fisher(model, [(x, y)], "categorical", structure="dense").to_dense(), ref)


@pytest.mark.parametrize("name", MODELS)
def test_jacobian_and_ntk_equal_the_reverse_mode_reference(name):
    model, x = build(name)
    J = per_example_jacobians(model, x)  # (N, C, P)
    J = J.reshape(-1, J.shape[-1])
    g = torch.Generator().manual_seed(3)
    v, u = torch.randn(J.shape[1], 2, generator=g), torch.randn(J.shape[0], 2, generator=g)
    jac = fl.jacobian(model, x)
    close(jac @ v, J @ v)
    close(jac.T @ u, J.T @ u)
    close(fl.ntk(model, x) @ u, J @ (J.T @ u))


@pytest.mark.parametrize("name", MODELS)
def test_fishleg_product_and_laplace_predictive_equal_the_reference(name):
    model, x = build(name)
    ref = exact_fisher(model, x, "categorical")
    layout = fl.ParamLayout.from_model(model)
    w = torch.randn(layout.numel, generator=torch.Generator().manual_seed(4))
    fw = fisher_vector_product(model, get_likelihood("categorical"), x, layout.unflatten(w))
    close(layout.flatten(fw), ref @ w)

    y = torch.randint(0, model(x).shape[1], (N,), generator=torch.Generator().manual_seed(5))
    la = fl.laplace.Laplace(model, (x, y), "categorical", structure="diag", prior_precision=1.0)
    sigma = torch.diag(1.0 / la.posterior_precision.diagonal())
    J = per_example_jacobians(model, x)
    J = J.reshape(-1, J.shape[-1])
    _, joint = la.predictive(x, joint=True)
    torch.testing.assert_close(joint, J @ sigma @ J.T, rtol=1e-8, atol=1e-10)


def test_the_padding_row_reaches_the_tied_head():
    """The case the old tangent zeroing got wrong: the head's use of row 0 has a derivative."""
    model, x = build("tied")
    J = per_example_jacobians(model, x)  # (N, C, P), P starts with emb.weight (V, D)
    assert J[:, :, :D].abs().max() > 1e-3  # row 0 of the tied weight: the head uses it
    v = torch.zeros(J.shape[-1])
    v[:D] = 1.0  # a direction on the padding row only
    close(fl.jacobian(model, x) @ v, J.reshape(-1, J.shape[-1]) @ v)
