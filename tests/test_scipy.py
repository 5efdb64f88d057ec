"""to_scipy: a torch LinearOperator driven by scipy.sparse.linalg solvers, float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from linear_operator.operators import DenseLinearOperator, KroneckerProductLinearOperator

from fim_linops.scipy import to_scipy


def random_psd(n: int, seed: int, shift: float = 1e-1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    return x @ x.T / n + shift * torch.eye(n, dtype=torch.float64)


@pytest.fixture
def dense() -> torch.Tensor:
    return random_psd(40, 0)


def test_products_match_the_dense_matrix(dense):
    A = to_scipy(DenseLinearOperator(dense))
    M = dense.numpy()
    rng = np.random.default_rng(0)
    x, X = rng.standard_normal(40), rng.standard_normal((40, 3))
    assert A.shape == (40, 40) and A.dtype == np.float64
    np.testing.assert_allclose(A.matvec(x), M @ x, rtol=1e-12)
    np.testing.assert_allclose(A.matmat(X), M @ X, rtol=1e-12)
    np.testing.assert_allclose(A.rmatvec(x), M.T @ x, rtol=1e-12)
    np.testing.assert_allclose(A.rmatmat(X), M.T @ X, rtol=1e-12)
    np.testing.assert_allclose(A @ x[:, None], (M @ x)[:, None], rtol=1e-12)


def test_rmatvec_is_the_transpose_for_a_nonsymmetric_operator():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(7, 5, generator=g, dtype=torch.float64)
    A = to_scipy(DenseLinearOperator(B))
    y = np.arange(7.0)
    np.testing.assert_allclose(A.rmatvec(y), B.numpy().T @ y, rtol=1e-12)
    np.testing.assert_allclose(A.H.matvec(y), B.numpy().T @ y, rtol=1e-12)


def test_matmat_is_one_operator_product(dense):
    calls = []

    class Counting(DenseLinearOperator):
        def _matmul(self, rhs):
            calls.append(rhs.shape)
            return super()._matmul(rhs)

    A = to_scipy(Counting(dense))
    A.matmat(np.ones((40, 6)))
    assert calls == [torch.Size([40, 6])]


def test_float32_operator_converts_both_ways(dense):
    A = to_scipy(DenseLinearOperator(dense.float()), dtype=np.float32)
    y = A.matvec(np.ones(40))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, dense.sum(1).numpy(), rtol=1e-5)


def test_complex_input_on_a_real_operator(dense):
    A = to_scipy(DenseLinearOperator(dense))
    z = np.arange(40.0) + 1j * np.ones(40)
    np.testing.assert_allclose(A.matvec(z), dense.numpy() @ z, rtol=1e-12)


def test_eigsh_top_eigenvalues_of_a_kronecker_product():
    a, b = random_psd(6, 2), random_psd(7, 3)
    K = KroneckerProductLinearOperator(DenseLinearOperator(a), DenseLinearOperator(b))
    exact = np.sort(np.linalg.eigvalsh(np.kron(a.numpy(), b.numpy())))
    vals = sla.eigsh(to_scipy(K), k=4, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), exact[-4:], rtol=1e-10)


@pytest.mark.parametrize("solver", ["cg", "minres", "gmres"])
def test_krylov_solvers_solve_a_psd_system(dense, solver):
    A = to_scipy(DenseLinearOperator(dense))
    b = np.linspace(-1.0, 1.0, 40)
    x, info = getattr(sla, solver)(A, b, rtol=1e-12, maxiter=2000)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(dense.numpy(), b), rtol=1e-8, atol=1e-10)


def test_lsqr_solves_a_least_squares_problem():
    g = torch.Generator().manual_seed(4)
    B = torch.randn(30, 8, generator=g, dtype=torch.float64)
    b = np.linspace(0.0, 1.0, 30)
    x = sla.lsqr(to_scipy(DenseLinearOperator(B)), b, atol=1e-14, btol=1e-14)[0]
    np.testing.assert_allclose(x, np.linalg.lstsq(B.numpy(), b, rcond=None)[0], rtol=1e-8)


def test_a_plain_tensor_is_accepted(dense):
    np.testing.assert_allclose(to_scipy(dense).matvec(np.ones(40)), dense.sum(1).numpy())


def test_products_do_not_build_an_autograd_graph(dense):
    leaf = dense.clone().requires_grad_(True)
    y = to_scipy(DenseLinearOperator(leaf)).matvec(np.ones(40))
    assert isinstance(y, np.ndarray)  # .numpy() would raise on a tensor that requires grad


def test_three_dimensional_input_is_rejected():
    with pytest.raises(ValueError, match="2-d operator"):
        to_scipy(torch.zeros(2, 3, 3))
