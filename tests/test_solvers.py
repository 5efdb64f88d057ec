"""Solvers: our batched CG, natural gradients through exact solves or CG, and the EWC penalty,
against dense float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from linear_operator.operators import (
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductLinearOperator,
)
from torch import nn

from fim_linops.solvers import cg, ewc_penalty, natural_gradient

F64 = torch.float64


def random_psd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or n, generator=g, dtype=F64)
    return x @ x.T / n


def badly_scaled(n: int = 60, seed: int = 0) -> torch.Tensor:
    """S (I + E) S with S spanning four decades: CG without a preconditioner is slow, Jacobi
    preconditioning removes the scaling."""
    s = torch.logspace(0, 2, n, dtype=F64)
    return s[:, None] * (torch.eye(n, dtype=F64) + 0.5 * random_psd(n, seed)) * s


def relative_residual(A: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(b - A @ x, dim=0) / torch.linalg.vector_norm(b, dim=0)


# ---------------------------------------------------------------------------- cg


def test_cg_tolerance_holds_per_column_of_very_different_scales():
    A = random_psd(50, 1) + 0.1 * torch.eye(50, dtype=F64)
    g = torch.Generator().manual_seed(2)
    B = torch.randn(50, 3, generator=g, dtype=F64) * torch.tensor([1e-6, 1.0, 1e4], dtype=F64)
    for tol in (1e-4, 1e-10):
        X, info = cg(DenseLinearOperator(A), B, tol=tol)
        res = relative_residual(A, X, B)
        assert (res <= tol).all() and info.converged.all()
        np.testing.assert_allclose(info.residuals[-1].numpy(), res.numpy(), rtol=1e-6)
    np.testing.assert_allclose(X.numpy(), torch.linalg.solve(A, B).numpy(), rtol=1e-7)


def test_cg_restarts_from_the_true_residual_when_the_recurrence_drifts():
    g = torch.Generator().manual_seed(16)
    Q = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=F64)).Q
    A = (Q * torch.logspace(0, -8, 80, dtype=F64)) @ Q.T  # condition number 1e8
    B = torch.randn(80, 2, generator=g, dtype=F64)
    products = []

    def matmul(v):
        products.append(v.shape)
        return A @ v

    X, info = cg(matmul, B, tol=1e-8, max_iter=20000)
    assert info.converged.all() and (relative_residual(A, X, B) <= 1e-8).all()
    # beyond the iterations: a failed true-residual check, the restart, the final check
    assert len(products) >= info.iterations + 3


def test_cg_vector_right_hand_side_and_info():
    A = random_psd(30, 3) + torch.eye(30, dtype=F64)
    b = torch.linspace(-1, 1, 30, dtype=F64)
    x, info = cg(A, b, tol=1e-8)
    assert x.shape == (30,)
    assert info.residuals.shape == (info.iterations + 1, 1)
    assert info.residuals[0, 0] == 1.0 and info.residuals[-1, 0] <= 1e-8
    assert 0 < info.iterations <= 30
    np.testing.assert_allclose(x.numpy(), torch.linalg.solve(A, b).numpy(), rtol=1e-6)


def test_cg_jacobi_preconditioner_cuts_iterations_and_keeps_the_solution():
    A = badly_scaled()
    b = torch.ones(60, dtype=F64)
    x_plain, plain = cg(A, b, tol=1e-10)
    jacobi = DiagLinearOperator(A.diagonal())
    x_pre, pre = cg(A, b, tol=1e-10, preconditioner=jacobi)
    x_fn, fn = cg(A, b, tol=1e-10, preconditioner=lambda r: r / A.diagonal()[:, None])
    assert pre.iterations < plain.iterations / 2
    assert fn.iterations == pre.iterations
    reference = torch.linalg.solve(A, b)
    for x in (x_plain, x_pre, x_fn):
        np.testing.assert_allclose(x.numpy(), reference.numpy(), rtol=1e-6)
    x_dense, _ = cg(A, b, tol=1e-10, preconditioner=torch.diag(A.diagonal()))
    np.testing.assert_allclose(x_dense.numpy(), reference.numpy(), rtol=1e-6)


def test_cg_from_the_solution_takes_no_iteration():
    A = random_psd(20, 4) + torch.eye(20, dtype=F64)
    b = torch.ones(20, dtype=F64)
    x, info = cg(A, b, tol=1e-8, x0=torch.linalg.solve(A, b))
    assert info.iterations == 0 and info.converged.all()


def test_cg_zero_right_hand_side_gives_zero():
    A = random_psd(20, 5) + torch.eye(20, dtype=F64)
    B = torch.stack([torch.zeros(20, dtype=F64), torch.ones(20, dtype=F64)], 1)
    X, info = cg(A, B, tol=1e-9)
    assert torch.equal(X[:, 0], torch.zeros(20, dtype=F64)) and info.converged.all()


def test_cg_reports_non_convergence_at_max_iter():
    A = badly_scaled()
    x, info = cg(A, torch.ones(60, dtype=F64), tol=1e-12, max_iter=3)
    assert info.iterations == 3 and not info.converged.any()
    np.testing.assert_allclose(
        info.residuals[-1].numpy(),
        relative_residual(A, x[:, None], torch.ones(60, 1, dtype=F64)).numpy(),
    )


def test_cg_accepts_a_callable_operator_on_a_kronecker_product():
    a, b = random_psd(5, 6) + torch.eye(5, dtype=F64), random_psd(4, 7) + torch.eye(4, dtype=F64)
    K = KroneckerProductLinearOperator(DenseLinearOperator(a), DenseLinearOperator(b))
    rhs = torch.arange(20, dtype=F64)
    x, _ = cg(lambda v: K @ v, rhs, tol=1e-12)
    np.testing.assert_allclose(
        x.numpy(), torch.linalg.solve(torch.kron(a, b), rhs).numpy(), rtol=1e-9
    )


# ---------------------------------------------------------------------------- natural gradient


@pytest.fixture
def fisher() -> torch.Tensor:
    return random_psd(40, 8, rank=10)  # singular, like a Fisher with fewer examples than P


def test_natural_gradient_exact_matches_the_damped_dense_solve(fisher):
    g = torch.linspace(-1, 1, 40, dtype=F64)
    damped = fisher + 0.1 * torch.eye(40, dtype=F64)
    reference = torch.linalg.solve(damped, g)
    exact = natural_gradient(DenseLinearOperator(fisher), g, damping=0.1)
    np.testing.assert_allclose(exact.numpy(), reference.numpy(), rtol=1e-9)
    G = torch.stack([g, g.flip(0)], 1)
    batched = natural_gradient(fisher, G, damping=0.1)
    np.testing.assert_allclose(batched.numpy(), torch.linalg.solve(damped, G).numpy(), rtol=1e-9)


def test_natural_gradient_without_damping_calls_solve():
    F = random_psd(30, 9) + 0.5 * torch.eye(30, dtype=F64)
    g = torch.ones(30, dtype=F64)
    np.testing.assert_allclose(
        natural_gradient(DenseLinearOperator(F), g).numpy(),
        torch.linalg.solve(F, g).numpy(),
        rtol=1e-9,
    )


def test_natural_gradient_by_cg_matches_exact_to_the_tolerance(fisher):
    g = torch.linspace(-1, 1, 40, dtype=F64)
    exact = natural_gradient(fisher, g, damping=0.1)
    by_cg = natural_gradient(DenseLinearOperator(fisher), g, damping=0.1, method="cg", tol=1e-10)
    np.testing.assert_allclose(by_cg.numpy(), exact.numpy(), rtol=1e-7)


def test_natural_gradient_by_cg_with_a_kronecker_preconditioner():
    a, b = random_psd(6, 10), random_psd(7, 11)
    K = torch.kron(a, b)
    F = K + 0.05 * random_psd(42, 12)  # a Fisher that a Kronecker product nearly matches
    pre = KroneckerProductLinearOperator(
        DenseLinearOperator(a), DenseLinearOperator(b)
    ).add_diagonal(torch.tensor(1e-2, dtype=F64))
    g = torch.ones(42, dtype=F64)
    x = natural_gradient(F, g, damping=1e-2, method="cg", preconditioner=pre, tol=1e-10)
    reference = torch.linalg.solve(F + 1e-2 * torch.eye(42, dtype=F64), g)
    np.testing.assert_allclose(x.numpy(), reference.numpy(), rtol=1e-7)
    _, plain = cg(F + 1e-2 * torch.eye(42, dtype=F64), g, tol=1e-10)
    _, preconditioned = cg(F + 1e-2 * torch.eye(42, dtype=F64), g, tol=1e-10, preconditioner=pre)
    assert preconditioned.iterations < plain.iterations


def test_natural_gradient_warns_when_cg_does_not_converge(fisher):
    with pytest.warns(UserWarning, match="CG stopped"):
        natural_gradient(fisher, torch.ones(40, dtype=F64), damping=1e-8, method="cg", max_iter=2)


def test_natural_gradient_rejects_bad_arguments(fisher):
    g = torch.ones(40, dtype=F64)
    with pytest.raises(ValueError, match="method"):
        natural_gradient(fisher, g, method="lbfgs")
    with pytest.raises(ValueError, match="damping"):
        natural_gradient(fisher, g, damping=-1.0)
    with pytest.raises(ValueError, match="preconditioner"):
        natural_gradient(fisher, g, damping=1.0, preconditioner=lambda r: r)


# ---------------------------------------------------------------------------- ewc


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_ewc_penalty_value_and_gradient():
    model = small_model()
    theta = nn.utils.parameters_to_vector(model.parameters()).detach()
    P = theta.numel()
    F = random_psd(P, 13)
    anchor = theta + torch.linspace(-0.1, 0.1, P, dtype=F64)
    penalty = ewc_penalty(DenseLinearOperator(F), model.parameters(), anchor)
    delta = theta - anchor
    np.testing.assert_allclose(float(penalty.detach()), float(0.5 * delta @ F @ delta), rtol=1e-12)
    penalty.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    np.testing.assert_allclose(grads.numpy(), (F @ delta).numpy(), rtol=1e-12)


def test_ewc_penalty_is_zero_at_the_anchor_and_accepts_a_module():
    model = small_model()
    anchor = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    F = DenseLinearOperator(random_psd(anchor.numel(), 14))
    assert float(ewc_penalty(F, model, anchor).detach()) == 0.0


def test_ewc_penalty_with_float32_parameters_and_a_float64_fisher():
    model = small_model().float()
    theta = nn.utils.parameters_to_vector(model.parameters())
    F = random_psd(theta.numel(), 15)
    anchor = torch.zeros_like(theta)
    penalty = ewc_penalty(F, model.parameters(), anchor)
    penalty.backward()
    assert model[0].weight.grad.dtype == torch.float32
    np.testing.assert_allclose(
        float(penalty.detach()),
        float(0.5 * theta.detach().double() @ F @ theta.detach().double()),
        rtol=1e-6,
    )


def test_ewc_penalty_rejects_an_anchor_of_the_wrong_size():
    model = small_model()
    with pytest.raises(ValueError, match="anchor"):
        ewc_penalty(random_psd(3, 0), model.parameters(), torch.zeros(3, dtype=F64))
