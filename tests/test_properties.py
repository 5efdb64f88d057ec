"""Property tests on random small MLP/CNN shapes (hypothesis): symmetry, diagonal() = diagonal of
to_dense(), damped solve inverts matmul, every structure PSD; and numerics: dead layers give
zeros, not NaN; no P x P allocation for structures that do not need one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fim_linops as fl

STRUCTURES = ["dense", "block_diag", "diag", "kfac", "implicit"]


def _model(kind: str, width: int, classes: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, classes))
        x = torch.randn(5, 3)
    else:
        model = nn.Sequential(
            nn.Conv2d(2, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(width * 9, classes),
        )
        x = torch.randn(5, 2, 5, 5)
    return model.double(), x.double()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["mlp", "cnn"]),
    width=st.integers(1, 4),
    classes=st.integers(2, 4),
    seed=st.integers(0, 1000),
    structure=st.sampled_from(STRUCTURES),
)
def test_structure_properties(
    kind: str, width: int, classes: int, seed: int, structure: str
) -> None:
    model, x = _model(kind, width, classes, seed)
    y = torch.randint(0, classes, (x.shape[0],))
    F = fl.fisher(model, (x, y), structure=structure)
    p = F.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    v, w = (
        torch.randn(p, generator=gen, dtype=torch.float64),
        torch.randn(p, generator=gen, dtype=torch.float64),
    )
    assert torch.allclose(w @ (F @ v), v @ (F @ w), rtol=1e-10, atol=1e-13)
    dense = F.to_dense()
    assert torch.allclose(F.diagonal(), dense.diagonal(), rtol=1e-10, atol=1e-14)
    assert torch.allclose(dense, dense.T, atol=1e-13)
    assert torch.linalg.eigvalsh(dense).min() > -1e-10 * max(1.0, float(dense.abs().max()))
    damped = F.add_diagonal(torch.tensor(0.1, dtype=torch.float64))
    b = torch.randn(p, generator=gen, dtype=torch.float64)
    assert torch.allclose(damped @ damped.solve(b), b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_dead_layers_give_zeros_not_nan(structure: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU is dead: zero gradients into layer 0
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    F = fl.fisher(model, (x, y), structure=structure)
    d = F.diagonal()
    assert torch.isfinite(d).all()
    assert (d[: 3 * 4 + 4] == 0).all()
    sol = F.add_diagonal(torch.tensor(1e-3)).solve(torch.ones(F.shape[-1]))
    assert torch.isfinite(sol).all()


def test_no_p_by_p_allocation_for_diag_kfac_and_implicit() -> None:
    # P ~ 4.2M: a P x P float32 matrix would need ~70 TB; these structures must not try
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    x, y = torch.randn(16, 2048), torch.randint(0, 10, (16,))
    p = sum(q.numel() for q in model.parameters())
    assert p > 4_000_000
    for structure in ("diag", "kfac", "implicit"):
        F = fl.fisher(model, (x, y), structure=structure)
        v = torch.randn(p)
        assert torch.isfinite(F @ v).all()
        assert torch.isfinite(fl.trace(F))
    with pytest.raises(MemoryError, match="structure='kfac'"):
        fl.fisher(model, (x, y), structure="dense")
