r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

The spectral measure of A (P, P) with eigenpairs (lambda_l, u_l) is mu = (1/P) sum_l delta(lambda_l).
For a probe z with E[z z^T] = I, the measure mu_z = sum_l (u_l^T z)^2 / ||z||^2 delta(lambda_l)
satisfies E[mu_z] = mu (exactly for Gaussian z by rotation invariance, and for every polynomial
moment with Rademacher z). m Lanczos steps from q_1 = z / ||z|| give T_m = S diag(theta) S^T, and
the Gauss quadrature mu_z ~ sum_i tau_i delta(theta_i) with nodes theta_i (Ritz values) and weights
tau_i = S_{1i}^2 (summing to 1) is exact for polynomials of degree <= 2m - 1. Averaging over
n_probes probes and smoothing each node by a Gaussian kernel of width sigma gives the density

    phi(t) = (1/n) sum_j sum_i tau_ji N(t; theta_ji, sigma^2).

With ``log=True`` the smoothing happens in u = log(lambda) (nodes clamped at a floor), which
resolves the bulk of near-zero eigenvalues of a Fisher over many decades; the density is then
reported per unit lambda, phi(t) = psi(log t) / t, so it still integrates to 1 over the grid.

Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature" (SIMAX 2017);
Ghorbani, Krishnan & Xiao (ICML 2019); Papyan (JMLR 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.spectral.estimators import random_probes
from fim_linops.spectral.lanczos import LanczosRecurrence

__all__ = ["SpectralDensity", "density"]

Operator: TypeAlias = LinearOperator | Tensor


@dataclass
class SpectralDensity:
    r"""Result of :func:`density`.

    Attributes:
        grid: (G,) eigenvalue grid (increasing; geometric when ``log``).
        density: (G,) smoothed density phi on ``grid`` (per unit eigenvalue; integrates to ~1).
        nodes: (n_probes, m) Ritz values theta_ji of each probe's quadrature.
        weights: (n_probes, m) quadrature weights tau_ji, each row summing to 1.
        lambda_min, lambda_max: 0-d, the extreme Ritz values over all probes (they converge to the
            extreme eigenvalues first).
        sigma: kernel width (in eigenvalue units, or in log-eigenvalue units when ``log``).
        log: whether the smoothing was done in log(eigenvalue).
        floor: 0-d clamp applied to the nodes before the log (``None`` when not ``log``).
        size: P, the operator size. n_probes, n_steps, seed, probes: the settings used.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    lambda_min: Tensor
    lambda_max: Tensor
    sigma: Tensor
    log: bool
    floor: Tensor | None
    size: int
    n_probes: int
    n_steps: int
    seed: int
    probes: str

    def moment(self, k: int) -> Tensor:
        r"""Estimate of tr(A^k) / P = (1/n) sum_j sum_i tau_ji theta_ji^k (exact per probe for k <= 2m - 1)."""
        return (self.weights * self.nodes**k).sum(-1).mean()

    def trace_estimate(self, P: int | None = None) -> Tensor:
        r"""Estimate of tr(A) = P * moment(1) (P defaults to the operator size)."""
        return (self.size if P is None else P) * self.moment(1)

    def cdf(self, t: Tensor) -> Tensor:
        r"""Quadrature CDF (1/n) sum_j sum_i tau_ji 1[theta_ji <= t], for t of any shape."""
        t = torch.as_tensor(t, dtype=self.nodes.dtype, device=self.nodes.device)
        below = (self.nodes.reshape(-1) <= t[..., None]).to(self.weights.dtype)
        return (below * self.weights.reshape(-1)).sum(-1) / self.n_probes

    def plot(self, ax=None, log: bool = True, **kwargs):
        """Plot the density against the eigenvalue; ``log``: log-scale density axis (and a log
        eigenvalue axis when the density was smoothed in log space). Returns the matplotlib Axes."""
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots()
        x, y = self.grid.numpy(force=True), self.density.numpy(force=True)
        if log:
            positive = y[y > 0]
            y = y.clip(min=positive.min() if positive.size else 1e-300)
            ax.set_yscale("log")
        if self.log:
            ax.set_xscale("log")
        ax.plot(x, y, **kwargs)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("spectral density")
        return ax


def _gaussian_mixture(u: Tensor, centres: Tensor, weights: Tensor, sigma: Tensor) -> Tensor:
    """sum_c weights_c N(u_g; centres_c, sigma^2) for grid u (G,), centres and weights (C,)."""
    z = (u[:, None] - centres[None, :]) / sigma
    return (weights * torch.exp(-0.5 * z * z)).sum(-1) / (sigma * math.sqrt(2 * math.pi))


def density(
    op: Operator,
    n_probes: int = 10,
    n_steps: int = 80,
    seed: int = 0,
    sigma: float | None = None,
    grid: Tensor | None = None,
    log: bool = False,
    *,
    probes: str = "rademacher",
    n_grid: int = 1000,
    floor: float | None = None,
    reorth: str = "full",
) -> SpectralDensity:
    r"""Spectral density of a symmetric A (P, P) by stochastic Lanczos quadrature.

    All ``n_probes`` Lanczos recurrences run together: each step is one product ``op @ V`` with
    V (P, n_probes), and full reorthogonalisation is per probe (memory n_steps x P x n_probes).

    Args:
        op: symmetric ``LinearOperator`` or Tensor (P, P); any dtype and device.
        n_probes: number of random probes n.
        n_steps: Lanczos steps m per probe (capped at P).
        seed: seed of the probes (a ``torch.Generator`` on ``op``'s device).
        sigma: Gaussian kernel width; default 1% of the Ritz range (of the log range when ``log``).
        grid: eigenvalues at which to evaluate the density; default ``n_grid`` points spanning the
            Ritz range padded by 5 sigma (geometric from the floor when ``log``).
        log: smooth in log(eigenvalue), nodes clamped at ``floor`` (default 1e3 eps lambda_max);
            negative and tiny eigenvalues all land at the floor.
        probes: ``"rademacher"`` or ``"gaussian"``.
        reorth: ``"full"`` or ``"none"`` (three-term recurrence only, memory O(P n)).
    """
    if op.dim() != 2 or op.shape[0] != op.shape[1]:
        raise ValueError(f"density: expected a square (P, P) operator, got shape {tuple(op.shape)}")
    if n_probes < 1 or n_steps < 1:
        raise ValueError(f"density: n_probes and n_steps must be >= 1, got {n_probes}, {n_steps}")
    P, dtype, device = op.shape[-1], op.dtype, op.device
    gen = torch.Generator(device=device).manual_seed(seed)
    Z = random_probes(P, n_probes, dtype=dtype, device=device, generator=gen, kind=probes)
    rec = LanczosRecurrence(op, Z, reorth=reorth, generator=gen).extend(n_steps)
    theta, S = torch.linalg.eigh(rec.tridiagonal())  # (n, m), (n, m, m)
    tau = S[:, 0, :] ** 2
    lo, hi = theta.amin(), theta.amax()
    centres, w = theta.reshape(-1), tau.reshape(-1) / n_probes
    tiny = torch.finfo(dtype).tiny
    if not log:
        width = (hi - lo).clamp_min(hi.abs() * 1e-3).clamp_min(tiny)
        s = torch.as_tensor(0.01 * width if sigma is None else sigma, dtype=dtype, device=device)
        if grid is None:
            steps = torch.linspace(0, 1, n_grid, dtype=dtype, device=device)
            grid = lo - 5 * s + steps * (hi - lo + 10 * s)
        grid = torch.as_tensor(grid, dtype=dtype, device=device)
        phi = _gaussian_mixture(grid, centres, w, s)
        fl: Tensor | None = None
    else:
        eps = torch.finfo(dtype).eps
        fl = torch.as_tensor(
            (1e3 * eps * hi.abs()).clamp_min(tiny) if floor is None else floor,
            dtype=dtype,
            device=device,
        )
        u = centres.clamp_min(fl).log()
        u_lo, u_hi = fl.log(), hi.clamp_min(fl).log()
        width = (u_hi - u_lo).clamp_min(1e-3)
        s = torch.as_tensor(0.01 * width if sigma is None else sigma, dtype=dtype, device=device)
        if grid is None:
            steps = torch.linspace(0, 1, n_grid, dtype=dtype, device=device)
            grid = (u_lo - 5 * s + steps * (u_hi - u_lo + 10 * s)).exp()
        grid = torch.as_tensor(grid, dtype=dtype, device=device)
        phi = _gaussian_mixture(grid.clamp_min(tiny).log(), u, w, s) / grid.clamp_min(tiny)
    return SpectralDensity(
        grid=grid,
        density=phi,
        nodes=theta,
        weights=tau,
        lambda_min=lo,
        lambda_max=hi,
        sigma=s,
        log=log,
        floor=fl,
        size=P,
        n_probes=n_probes,
        n_steps=rec.steps,
        seed=seed,
        probes=probes,
    )
