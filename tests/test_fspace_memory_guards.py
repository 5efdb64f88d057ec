"""Memory guards of the function-space results: dense Jacobians, dense and lowrank NTKs, the
implicit NTK's to_dense, the dense Laplace posterior and the joint predictive raise a clear
ValueError (naming what fits) before allocating when over ``max_bytes``, and work again with the
override."""

from __future__ import annotations

import models
import pytest
import torch

import fim_linops as fl
from fim_linops.laplace import Laplace
from fim_linops.memory_guard import MemoryLimitError


@pytest.fixture
def mlp():
    model, x, y = models.mlp()
    return model, x, y


def test_dense_jacobian_guard_names_the_matrix_free_route(mlp):
    model, x, _ = mlp
    j = fl.jacobian(model, x, max_bytes=1000)  # (8*4, 118) float32 = 15,104 bytes
    with pytest.raises(ValueError, match="J @ V") as err:
        j.to_dense()
    assert isinstance(err.value, MemoryError) and isinstance(err.value, MemoryLimitError)
    v = torch.randn(j.shape[-1])
    assert (j @ v).shape == (j.shape[0],)  # products need no dense Jacobian
    with pytest.raises(ValueError):
        j.T.to_dense()
    full = fl.jacobian(model, x, max_bytes=None).to_dense()
    assert full.shape == (32, j.shape[1])


@pytest.mark.parametrize("structure", ["dense", "lowrank"])
def test_ntk_guard_suggests_implicit_before_allocating(mlp, structure, monkeypatch):
    model, x, _ = mlp
    import fim_linops.engine.gram as gram

    ran = []
    monkeypatch.setattr(gram, "side", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match="implicit"):
        fl.ntk(model, x, structure=structure, max_bytes=1000)
    assert ran == []  # no batch was run through the Gram before the check
    monkeypatch.undo()
    k = fl.ntk(model, x, structure=structure, max_bytes=None)
    assert k.shape == (32, 32)


def test_implicit_ntk_products_work_but_to_dense_is_guarded(mlp):
    model, x, _ = mlp
    k = fl.ntk(model, x, structure="implicit", max_bytes=1000)
    assert (k @ torch.randn(32)).shape == (32,)
    with pytest.raises(ValueError, match="structure='implicit'"):
        k.to_dense()
    sum_k = fl.ntk(model, x, structure="dense", outputs="sum", max_bytes=8 * 8 * 4)
    assert sum_k.shape == (8, 8)  # (N, N) fits where (N*C, N*C) does not


def test_laplace_dense_posterior_and_joint_predictive_are_guarded(mlp):
    model, x, y = mlp
    with pytest.raises(ValueError, match="structure='kfac'"):
        Laplace(model, (x, y), structure="dense", max_bytes=1000)
    with pytest.raises(ValueError, match="block-diagonal"):
        Laplace(model, (x, y), structure="block_diag", max_bytes=1000)
    la = Laplace(model, (x, y), structure="kfac", max_bytes=32 * 32 * 4 - 1)
    with pytest.raises(ValueError, match="joint=False"):
        la.predictive(x, joint=True)
    _, cov = la.predictive(x)  # per example (N, C, C) fits
    assert cov.shape == (8, 4, 4)
    la.max_bytes = None
    _, joint = la.predictive(x, joint=True)
    assert joint.shape == (32, 32)


def test_laplace_dense_predictive_guards_the_batch_jacobian(mlp):
    model, x, y = mlp
    la = Laplace(model, (x, y), structure="dense")
    la.max_bytes = 1000
    with pytest.raises(ValueError, match="batch_size"):
        la.predictive(x)
    la.batch_size = 1
    la.max_bytes = 4 * la.layout.numel * 4  # one example: (C, P) float32
    _, cov = la.predictive(x)
    assert cov.shape == (8, 4, 4)
