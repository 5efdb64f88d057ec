"""Structured Laplace predictive (diag, KFAC, EKFAC posteriors) against J Sigma_structure J^T built
densely in float64: on the MLP, the CNN (grouped, dilated, reflect-padded convolutions), the
sequence model (Embedding, LayerNorm, Linear over positions), a model with raw parameters
(torch.func), per example and joint, over several batches; and without any N x C x P Jacobian."""

from __future__ import annotations

import sys

import models
import pytest
import torch
from reference import per_example_jacobians

import fim_linops.laplace.predictive  # noqa: F401  (the module that runs the predictive)
from fim_linops.laplace import Laplace
from fim_linops.layout import ParamLayout

predictive = sys.modules["fim_linops.laplace.predictive"]


pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


def _model(name: str):
    model, x, y = getattr(models, name)()
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    return model, x, y


def _params(model, name: str, structure: str):
    """KFAC has no LayerNorm rule: the sequence model's KFAC posterior is over the others."""
    if name == "seq_model" and structure != "diag":
        return [p for n, p in model.named_parameters() if not n.startswith("norm")]
    return None


CASES = [
    (name, structure, prior)
    for name in ("mlp", "cnn", "seq_model", "raw_param_model")
    for structure in ("diag", "kfac", "ekfac")
    for prior in ("scalar", "layer")
    if not (name == "raw_param_model" and structure != "diag")
]


@pytest.mark.parametrize(("name", "structure", "prior"), CASES)
def test_structured_predictive_equals_dense_j_sigma_jt(name, structure, prior, monkeypatch):
    model, x, y = _model(name)
    params = _params(model, name, structure)
    layout = ParamLayout.from_model(model, params)
    delta = 0.9 if prior == "scalar" else torch.linspace(0.5, 2.0, len(layout.blocks))
    la = Laplace(model, (x, y), structure=structure, prior_precision=delta, params=params)
    la.batch_size = 3  # several batches: joint blocks across batches
    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    j = per_example_jacobians(model, x, params)  # (N, C, P)
    n, c, _ = j.shape
    ref = j.reshape(n * c, -1) @ sigma @ j.reshape(n * c, -1).T

    def no_jacobian(*args, **kwargs):
        raise AssertionError("the structured predictive formed a Jacobian")

    monkeypatch.setattr(predictive, "jacobian_rows", no_jacobian)
    mean, cov = la.predictive(x)
    per_example = torch.stack([ref[i * c : (i + 1) * c, i * c : (i + 1) * c] for i in range(n)])
    torch.testing.assert_close(cov, per_example, rtol=1e-9, atol=1e-11)
    _, joint = la.predictive(x, joint=True)
    torch.testing.assert_close(joint, ref, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        torch.testing.assert_close(mean, model(x).reshape(n, -1))


def test_structured_predictive_takes_the_structured_route_and_dense_does_not(monkeypatch):
    model, x, y = _model("mlp")
    calls = []
    real = predictive.jacobian_rows
    monkeypatch.setattr(
        predictive, "jacobian_rows", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    Laplace(model, (x, y), structure="kfac").predictive(x)
    assert calls == []
    Laplace(model, (x, y), structure="dense").predictive(x)
    assert calls


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq_model", "raw_param_model"])
def test_lowrank_predictive_by_woodbury_equals_dense_j_sigma_jt(name):
    model, x, y = _model(name)
    la = Laplace(model, (x, y), structure="lowrank", rank=5, prior_precision=0.9)
    la.batch_size = 4
    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    j = per_example_jacobians(model, x)
    n, c, _ = j.shape
    ref = j.reshape(n * c, -1) @ sigma @ j.reshape(n * c, -1).T
    _, cov = la.predictive(x)
    per_example = torch.stack([ref[i * c : (i + 1) * c, i * c : (i + 1) * c] for i in range(n)])
    torch.testing.assert_close(cov, per_example, rtol=1e-8, atol=1e-10)
    _, joint = la.predictive(x, joint=True)
    torch.testing.assert_close(joint, ref, rtol=1e-8, atol=1e-10)
