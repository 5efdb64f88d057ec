"""The operator algebra: real powers, sums across structures, scaling, samples from
N(0, (F + damping)^-1), pickling and dtype moves, on every structure, against dense float64 forms."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fim_linops as fl
from fim_linops import algebra
from fim_linops.operators import Sum

pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    scale = b.abs().max().clamp_min(1e-300)
    return bool(((a - b).abs().max() / scale) < rtol)


@functools.cache
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(12, 4),
        nn.Tanh(),
        nn.Linear(4, 3),
    ).double()
    x = torch.randn(9, 2, 5, 5)
    return model, (x, torch.randint(0, 3, (9,)))


RANKS = {"lowrank": 6, "kron_sum": 2}


@functools.cache
def op(structure: str):
    model, data = setup()
    if structure == "mixed":
        return fl.fisher(model, data, structure={nn.Conv2d: "ekfac", "default": "block_diag"})
    return fl.fisher(model, data, structure=structure, rank=RANKS.get(structure))


def dense_power(d: torch.Tensor, alpha: float) -> torch.Tensor:
    lam, q = torch.linalg.eigh(d)
    return (q * lam**alpha) @ q.T


POWERABLE = ["dense", "block_diag", "diag", "kfac", "ekfac", "lowrank", "mixed"]


@pytest.mark.parametrize("structure", POWERABLE)
@pytest.mark.parametrize("alpha", [-1.0, 0.5, -0.5, 1.7])
def test_real_powers_are_exact(structure: str, alpha: float) -> None:
    Fd = op(structure).add_diagonal(torch.tensor(0.3))
    D = Fd.to_dense()
    P = algebra.power(Fd, alpha)
    expected = dense_power(D, alpha)
    assert close(P.to_dense(), expected, rtol=1e-9)
    # the power keeps an exact algebra: solve, damping on top, roots, logdet
    b = torch.randn(D.shape[0], 2)
    assert close(P.solve(b), torch.linalg.solve(expected, b), rtol=1e-8)
    P2 = P.add_diagonal(torch.tensor(0.1))
    assert close(P2.to_dense(), expected + 0.1 * torch.eye(D.shape[0]), rtol=1e-9)
    r = P.root_decomposition().root.to_dense()
    assert close(r @ r.T, expected, rtol=1e-9)
    assert close(P.inv_quad_logdet(logdet=True)[1], torch.logdet(expected), rtol=1e-9)
    assert close(fl.trace(P), torch.trace(expected), rtol=1e-9)


def test_power_of_a_structure_without_eigendecomposition_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="structural eigendecomposition"):
        algebra.power(op("quasi_diag"), 0.5)


SUMS = [
    ("diag", "diag", "Diag"),
    ("dense", "dense", "Dense"),
    ("block_diag", "block_diag", "BlockDiag"),
    ("lowrank", "lowrank", "LowRank"),
    ("kfac", "kfac", "KronSum"),
    ("kfac", "kron_sum", "KronSum"),
    ("quasi_diag", "quasi_diag", "QuasiDiag"),
    ("mixed", "mixed", "Mixed"),
    ("kfac", "diag", "Sum"),
    ("ekfac", "lowrank", "Sum"),
]


@pytest.mark.parametrize("s1,s2,kind", SUMS)
def test_sums_across_structures_are_exact(s1: str, s2: str, kind: str) -> None:
    F1 = op(s1).add_diagonal(torch.tensor(0.1))
    F2 = 2.0 * op(s2)
    S = algebra.add(F1, F2)
    assert type(S).__name__ == kind
    D = F1.to_dense() + F2.to_dense()
    assert close(S.to_dense(), D)
    b = torch.randn(D.shape[0], 2)
    assert close(S @ b, D @ b)
    assert close(S.diagonal(), D.diagonal())
    assert close(S.solve(b), torch.linalg.solve(D, b), rtol=1e-8)


def test_scaling_keeps_the_structure() -> None:
    for s in POWERABLE + ["quasi_diag", "kron_sum"]:
        F = op(s)
        assert type(3.0 * F) is type(F)
        assert close((3.0 * F).to_dense(), 3 * F.to_dense())


@pytest.mark.parametrize(
    "structure", ["dense", "kfac", "ekfac", "lowrank", "quasi_diag", "kron_sum", "mixed"]
)
def test_samples_have_covariance_the_inverse_damped_fisher(structure: str) -> None:
    F = op(structure)
    if structure == "kron_sum":
        F = fl.fisher(*setup(), structure="kron_sum", rank=1)
    damping = 1.0
    x = algebra.sample(F, 5, damping=damping, generator=torch.Generator().manual_seed(0))
    s = F.add_diagonal(torch.tensor(damping)).root_inv_decomposition().root.to_dense()
    z = torch.randn(s.shape[-1], 5, generator=torch.Generator().manual_seed(0))
    assert close(x, (s @ z).T)  # samples are S z with S S^T = (F + damping I)^-1, exactly:
    expected = torch.linalg.inv(F.to_dense() + damping * torch.eye(F.shape[-1]))
    assert close(s @ s.T, expected, rtol=1e-9)


ALL = [
    "dense",
    "block_diag",
    "diag",
    "kfac",
    "ekfac",
    "quasi_diag",
    "lowrank",
    "kron_sum",
    "implicit",
    "mixed",
]


def derived(name: str):
    if name == "power":
        return algebra.power(op("kfac").add_diagonal(torch.tensor(0.2)), -0.5)
    if name == "sum":
        return algebra.add(op("ekfac"), op("diag"))
    return op(name).add_diagonal(torch.tensor(0.2))


@pytest.mark.parametrize("structure", ALL + ["power", "sum"])
def test_every_operator_survives_pickling_and_dtype_moves(structure: str, tmp_path) -> None:
    F = derived(structure)
    D = F.to_dense()
    path = tmp_path / "op.pt"
    torch.save(F, path)
    G = torch.load(path, weights_only=False)
    assert type(G) is type(F)
    assert close(G.to_dense(), D)
    F32 = F.to(torch.float32)
    assert F32.dtype == torch.float32
    assert close(F32.to_dense().double(), D, rtol=1e-5)
    v = torch.randn(D.shape[0])
    assert close(F32.solve(v.float()).double(), torch.linalg.solve(D, v), rtol=1e-3)


def test_a_sum_across_structures_solves_by_cg_to_its_tolerance() -> None:
    S = algebra.add(op("ekfac").add_diagonal(torch.tensor(1e-3)), op("kfac"))
    assert isinstance(S, Sum)
    D = S.to_dense()
    b = torch.randn(D.shape[0])
    x = S.solve(b)
    assert torch.linalg.vector_norm(D @ x - b) <= 1e-9 * torch.linalg.vector_norm(b)
