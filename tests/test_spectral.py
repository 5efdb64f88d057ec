"""fim_linops.spectral: Lanczos, stochastic Lanczos quadrature and randomised estimators on generic
LinearOperators, against dense float64 references and scipy's eigsh."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse.linalg as sla  # noqa: E402
import torch  # noqa: E402
from linear_operator.operators import (  # noqa: E402
    DenseLinearOperator,
    KroneckerProductLinearOperator,
)

from fim_linops import spectral  # noqa: E402
from fim_linops.spectral.estimators import random_probes  # noqa: E402

F64 = torch.float64


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T for a random orthogonal Q."""
    g = torch.Generator().manual_seed(1000 + seed)  # not the probes' seeds
    n = eigenvalues.shape[0]
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    return (Q * eigenvalues) @ Q.T


def random_psd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, n + 3, generator=g, dtype=F64)
    return x @ x.T / n


@pytest.fixture(scope="module")
def decaying() -> torch.Tensor:
    """PSD, P = 200, eigenvalues 1 ... 1e-8 geometrically (a Fisher-like spectrum)."""
    return with_spectrum(torch.logspace(0, -8, 200, dtype=F64))


@pytest.fixture(scope="module")
def indefinite() -> torch.Tensor:
    """Symmetric, P = 200, eigenvalues t^3 for t in [-3, 5]: 40 % negative."""
    return with_spectrum(torch.linspace(-3, 5, 200, dtype=F64) ** 3, seed=1)


def counting(tensor: torch.Tensor) -> tuple[DenseLinearOperator, list]:
    """Dense operator and the list of right-hand-side shapes it is applied to (linear_operator
    rebuilds operators from their representation, so the record lives on the class)."""
    calls: list = []

    class Counting(DenseLinearOperator):
        def _matmul(self, rhs):
            calls.append(tuple(rhs.shape))
            return super()._matmul(rhs)

    return Counting(tensor), calls


def eigsh(A: torch.Tensor, k: int, which: str) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = sla.eigsh(A.numpy(), k=k, which=which, tol=1e-14)
    order = np.argsort(vals)
    return vals[order], vecs[:, order]


# ---------------------------------------------------------------------------- lanczos


def test_lanczos_top_eigenpairs_match_eigsh_on_a_decaying_spectrum(decaying):
    vals, vecs = spectral.lanczos(DenseLinearOperator(decaying), k=8, which="LA")
    ref_vals, ref_vecs = eigsh(decaying, 8, "LA")
    np.testing.assert_allclose(vals.numpy(), ref_vals, rtol=1e-8, atol=1e-12)
    assert (vals[1:] >= vals[:-1]).all()  # ascending, like eigsh
    overlap = (vecs.T @ torch.from_numpy(ref_vecs)).abs()  # equal up to sign
    np.testing.assert_allclose(overlap.diagonal().numpy(), 1.0, atol=1e-8)
    np.testing.assert_allclose((vecs.T @ vecs).numpy(), np.eye(8), atol=1e-12)


@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
def test_lanczos_keeps_negative_eigenvalues_of_an_indefinite_operator(indefinite, which):
    vals, vecs = spectral.lanczos(DenseLinearOperator(indefinite), k=5, which=which)
    ref_vals, _ = eigsh(indefinite, 5, which)
    np.testing.assert_allclose(vals.numpy(), ref_vals, rtol=1e-8, atol=1e-8)
    if which != "LA":
        assert vals[0] < -20  # the most negative eigenvalue is -27, not clamped
    residual = indefinite @ vecs - vecs * vals
    assert residual.norm() < 1e-8 * vals.abs().max()


def test_lanczos_accepts_a_plain_tensor_and_a_kronecker_operator():
    a, b = random_psd(8, 2), random_psd(9, 3)
    exact = torch.sort(torch.outer(torch.linalg.eigvalsh(a), torch.linalg.eigvalsh(b)).flatten())[0]
    K = KroneckerProductLinearOperator(DenseLinearOperator(a), DenseLinearOperator(b))
    vals, _ = spectral.lanczos(K, k=3)
    np.testing.assert_allclose(vals.numpy(), exact[-3:].numpy(), rtol=1e-10)
    vals_dense, _ = spectral.lanczos(torch.kron(a, b), k=3)
    np.testing.assert_allclose(vals_dense.numpy(), exact[-3:].numpy(), rtol=1e-10)


def test_lanczos_finds_repeated_eigenvalues_through_breakdown_restarts():
    vals, vecs = spectral.lanczos(torch.eye(12, dtype=F64), k=3)
    np.testing.assert_allclose(vals.numpy(), 1.0, rtol=1e-14)
    np.testing.assert_allclose((vecs.T @ vecs).numpy(), np.eye(3), atol=1e-12)
    spectrum = torch.cat([torch.full((3,), 5.0, dtype=F64), torch.linspace(0, 1, 37, dtype=F64)])
    vals, _ = spectral.lanczos(with_spectrum(spectrum, seed=4), k=4)
    np.testing.assert_allclose(vals.numpy(), [1.0, 5.0, 5.0, 5.0], rtol=1e-10)


def test_lanczos_without_reorthogonalisation_replays_the_recurrence_for_eigenvectors(indefinite):
    vals, vecs = spectral.lanczos(indefinite, k=2, which="LA", reorth="none", n_steps=60)
    ref_vals, _ = eigsh(indefinite, 2, "LA")
    np.testing.assert_allclose(vals.numpy(), ref_vals, rtol=1e-6)
    residual = indefinite @ vecs - vecs * vals
    assert residual.norm() < 1e-4 * vals.abs().max()


def test_lanczos_in_float32_matches_the_float64_reference(decaying):
    vals, vecs = spectral.lanczos(decaying.float(), k=4)
    assert vals.dtype == torch.float32 and vecs.dtype == torch.float32
    ref_vals, _ = eigsh(decaying, 4, "LA")
    np.testing.assert_allclose(vals.double().numpy(), ref_vals, rtol=1e-4)


def test_lanczos_with_n_steps_equal_to_P_is_exact(indefinite):
    vals, _ = spectral.lanczos(indefinite, k=200, which="LA", n_steps=200)
    np.testing.assert_allclose(vals.numpy(), torch.linalg.eigvalsh(indefinite).numpy(), atol=1e-10)


def test_lanczos_is_reproducible_for_a_seed(decaying):
    v1, x1 = spectral.lanczos(decaying, k=3, n_steps=30, seed=5)
    v2, x2 = spectral.lanczos(decaying, k=3, n_steps=30, seed=5)
    assert torch.equal(v1, v2) and torch.equal(x1, x2)


def test_lanczos_rejects_bad_arguments(decaying):
    with pytest.raises(ValueError, match="k must be"):
        spectral.lanczos(decaying, k=0)
    with pytest.raises(ValueError, match="which"):
        spectral.lanczos(decaying, k=2, which="LM")
    with pytest.raises(ValueError, match="square"):
        spectral.lanczos(torch.zeros(3, 4, dtype=F64), k=1)
    with pytest.raises(ValueError, match="reorth"):
        spectral.lanczos(decaying, k=1, reorth="partial")


# ---------------------------------------------------------------------------- density


def test_density_has_unit_mass_and_unit_weights_per_probe(decaying):
    for log in (False, True):
        d = spectral.density(DenseLinearOperator(decaying), n_probes=6, n_steps=40, log=log)
        assert d.nodes.shape == d.weights.shape == (6, 40)
        np.testing.assert_allclose(d.weights.sum(1).numpy(), 1.0, rtol=1e-12)
        mass = torch.trapezoid(d.density, d.grid)
        assert abs(float(mass) - 1.0) < 1e-3
        assert (d.density >= 0).all()


def test_density_runs_all_probes_together_with_one_product_per_step(decaying):
    op, calls = counting(decaying)
    spectral.density(op, n_probes=7, n_steps=25)
    assert calls == [(200, 7)] * 25


def test_density_first_moment_is_hutchinson_with_the_same_probes(decaying):
    d = spectral.density(decaying, n_probes=5, n_steps=30, seed=3)
    Z = random_probes(
        200, 5, dtype=F64, device=decaying.device, generator=torch.Generator().manual_seed(3)
    )
    hutchinson = (Z * (decaying @ Z)).sum() / 5
    np.testing.assert_allclose(float(d.trace_estimate()), float(hutchinson), rtol=1e-12)


def test_density_moments_converge_to_trace_and_frobenius_norm(decaying):
    d = spectral.density(decaying, n_probes=400, n_steps=20, seed=0)
    assert abs(float(d.trace_estimate(200) / decaying.trace()) - 1) < 0.05
    fro2 = (decaying**2).sum()
    assert abs(float(200 * d.moment(2) / fro2) - 1) < 0.05


def test_density_extreme_ritz_values_are_the_extreme_eigenvalues(indefinite):
    d = spectral.density(DenseLinearOperator(indefinite), n_probes=4, n_steps=80)
    lo, _ = eigsh(indefinite, 1, "SA")
    hi, _ = eigsh(indefinite, 1, "LA")
    np.testing.assert_allclose(float(d.lambda_min), lo[0], rtol=1e-8)
    np.testing.assert_allclose(float(d.lambda_max), hi[0], rtol=1e-8)


def test_density_of_a_kronecker_product_matches_its_exact_spectrum():
    a, b = random_psd(15, 5), random_psd(20, 6)
    K = KroneckerProductLinearOperator(DenseLinearOperator(a), DenseLinearOperator(b))
    exact = torch.sort(torch.outer(torch.linalg.eigvalsh(a), torch.linalg.eigvalsh(b)).flatten())[0]
    d = spectral.density(K, n_probes=30, n_steps=80)
    points = torch.cat([exact, d.nodes.flatten()])
    exact_cdf = torch.searchsorted(exact, points, right=True).to(F64) / exact.numel()
    kolmogorov = (d.cdf(points) - exact_cdf).abs().max()
    assert kolmogorov < 0.05
    # the smoothed density is within about one kernel width of the exact spectrum in
    # Wasserstein-1 distance, the integral of |CDF difference|
    smooth_cdf = torch.cumulative_trapezoid(d.density, d.grid)
    grid_exact = torch.searchsorted(exact, d.grid[1:], right=True).to(F64) / exact.numel()
    wasserstein = torch.trapezoid((smooth_cdf - grid_exact).abs(), d.grid[1:])
    assert wasserstein < 2 * d.sigma


def test_density_in_log_space_resolves_a_spectrum_over_eight_decades(decaying):
    d = spectral.density(decaying, n_probes=10, n_steps=80, log=True)
    assert (d.grid > 0).all() and d.grid[0] < 1e-9 and d.grid[-1] > 1.0
    # eigenvalues are uniform in log: about 1/8 of the mass per decade
    decade = (d.grid >= 1e-6) & (d.grid <= 1e-5)
    mass = torch.trapezoid(d.density[decade], d.grid[decade])
    assert abs(float(mass) - 1 / 8) < 0.04


def test_density_plot_returns_axes(decaying):
    import matplotlib.pyplot as plt

    d = spectral.density(decaying, n_probes=3, n_steps=20, log=True)
    ax = d.plot()
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
    assert len(ax.lines) == 1
    fig, ax2 = plt.subplots()
    assert spectral.density(decaying, n_probes=2, n_steps=10).plot(ax=ax2, log=False) is ax2
    plt.close("all")


def test_density_gaussian_probes_and_no_reorthogonalisation(decaying):
    d = spectral.density(decaying, n_probes=200, n_steps=15, probes="gaussian", reorth="none")
    np.testing.assert_allclose(d.weights.sum(1).numpy(), 1.0, rtol=1e-10)
    assert abs(float(d.trace_estimate() / decaying.trace()) - 1) < 0.1


# ---------------------------------------------------------------------------- estimators


def mean_error(estimate, exact, n_probes: int, seeds=range(6)) -> float:
    return float(np.mean([float((estimate(n_probes, s) - exact).norm()) for s in seeds]))


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp", "xtrace"])
def test_trace_error_decreases_with_the_number_of_probes(decaying, method):
    def est(n, s):
        return spectral.trace(DenseLinearOperator(decaying), n, method=method, seed=s)

    exact = decaying.trace()
    coarse, fine = mean_error(est, exact, 12), mean_error(est, exact, 192)
    assert fine < coarse / 2.5
    assert fine < 0.05 * float(exact)


@pytest.mark.parametrize("method", ["hutchpp", "xtrace"])
def test_trace_is_exact_for_a_matrix_of_rank_below_a_third_of_the_probes(method):
    g = torch.Generator().manual_seed(7)
    L = torch.randn(150, 5, generator=g, dtype=F64)
    A = L @ L.T  # rank 5 < 18 / 3
    np.testing.assert_allclose(
        float(spectral.trace(A, 18, method=method)), float(A.trace()), rtol=1e-10
    )


def test_hutchinson_diagonal_is_exact_for_a_diagonal_matrix():
    D = torch.linspace(1, 2, 50, dtype=F64)
    np.testing.assert_allclose(spectral.diagonal(torch.diag(D), 1).numpy(), D.numpy(), rtol=1e-14)


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_error_decreases_with_the_number_of_probes(decaying, method):
    def est(n, s):
        return spectral.diagonal(decaying, n, method=method, seed=s)

    exact = decaying.diagonal()
    assert mean_error(est, exact, 192) < mean_error(est, exact, 12) / 2.5


def test_xdiag_is_exact_for_a_low_rank_matrix():
    g = torch.Generator().manual_seed(8)
    L = torch.randn(120, 4, generator=g, dtype=F64)
    A = L @ L.T
    np.testing.assert_allclose(
        spectral.diagonal(A, 12, method="xdiag").numpy(), A.diagonal().numpy(), rtol=1e-9
    )


def test_frobenius_norm_estimate_converges(decaying):
    def est(n, s):
        return spectral.frobenius_norm(decaying, n, seed=s)

    exact = torch.linalg.matrix_norm(decaying)
    assert mean_error(est, exact, 192) < mean_error(est, exact, 12) / 2.5
    assert abs(float(est(400, 0) / exact) - 1) < 0.05


def test_estimators_work_on_a_kronecker_operator_and_are_seeded():
    a, b = random_psd(6, 9), random_psd(7, 10)
    K = KroneckerProductLinearOperator(DenseLinearOperator(a), DenseLinearOperator(b))
    exact = torch.kron(a, b)
    np.testing.assert_allclose(
        float(spectral.trace(K, 40, method="xtrace")), float(exact.trace()), rtol=0.05
    )
    assert torch.equal(spectral.trace(K, 9, seed=1), spectral.trace(K, 9, seed=1))
    assert not torch.equal(spectral.trace(K, 9, seed=1), spectral.trace(K, 9, seed=2))


def test_estimators_reject_bad_arguments(decaying):
    with pytest.raises(ValueError, match="method"):
        spectral.trace(decaying, 10, method="nope")
    with pytest.raises(ValueError, match="hutchpp"):
        spectral.trace(decaying, 2, method="hutchpp")
    with pytest.raises(ValueError, match="xdiag"):
        spectral.diagonal(torch.eye(3, dtype=F64), 10, method="xdiag")
    with pytest.raises(ValueError, match="square"):
        spectral.frobenius_norm(torch.zeros(2, 3), 4)
