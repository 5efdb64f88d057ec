r"""Randomised estimators of tr(A), diag(A) and ||A||_F from products with a block of probes.

Every estimator draws its probes Z (P, n) from a ``torch.Generator`` on the operator's device
(seeded by ``seed``, so results are reproducible and the global RNG is untouched) and applies the
operator to whole blocks, ``op @ Z``, never one probe at a time. ``op`` is any square
``LinearOperator`` or Tensor of shape (P, P); the estimators assume it symmetric (a Fisher, a GGN,
an NTK) where stated. Gradients flow through the products if the operator carries any.

References: Hutchinson (1989); Meyer, Musco, Musco & Woodruff, "Hutch++" (SOSA 2021);
Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic trace
estimation" (SIMAX 2024); Bekas, Kokiopoulou & Saad (2007) for the diagonal.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

__all__ = ["diagonal", "frobenius_norm", "random_probes", "trace"]

Operator: TypeAlias = LinearOperator | Tensor


def random_probes(
    size: int,
    n: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    kind: str = "rademacher",
) -> Tensor:
    r"""Probe block Z (size, n) with E[z z^T] = I: Rademacher (entries +-1) or standard Gaussian."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, (size, n), generator=generator, device=device, dtype=dtype)
        return 2 * bits - 1
    if kind == "gaussian":
        return torch.randn(size, n, generator=generator, device=device, dtype=dtype)
    raise ValueError(f"probes must be 'rademacher' or 'gaussian', got {kind!r}")


def _setup(op: Operator, n_probes: int, seed: int) -> tuple[int, torch.Generator]:
    if op.dim() != 2 or op.shape[0] != op.shape[1]:
        raise ValueError(f"expected a square (P, P) operator, got shape {tuple(op.shape)}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    return op.shape[-1], torch.Generator(device=op.device).manual_seed(seed)


def _probes(op: Operator, n: int, generator: torch.Generator) -> Tensor:
    return random_probes(op.shape[-1], n, dtype=op.dtype, device=op.device, generator=generator)


def _leave_one_out_basis(Y: Tensor) -> tuple[Tensor, Tensor]:
    r"""Q (P, m) orthonormal with range(Q) = range(Y), and S (m, m) with unit columns s_i such that
    Q (I - s_i s_i^T) Q^T projects onto the range of Y without its column i (S = normalised
    columns of R^{-T}, Y = Q R). Near-singular R (low-rank A) is clamped at eps |R|: the s_i then
    point into the numerical null directions of Y and the leave-one-out bases keep range(A)."""
    Q, R = torch.linalg.qr(Y)
    d = torch.diagonal(R)
    floor = torch.finfo(R.dtype).eps * d.abs().amax().clamp_min(torch.finfo(R.dtype).tiny)
    d_safe = torch.where(d < 0, -1.0, 1.0).to(R.dtype) * d.abs().clamp_min(floor)
    R = R - torch.diag_embed(d) + torch.diag_embed(d_safe)
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    RinvT = torch.linalg.solve_triangular(R.mT, eye, upper=False)  # R^{-T}, lower triangular
    S = RinvT / torch.linalg.vector_norm(RinvT, dim=0)
    return Q, S


def trace(op: Operator, n_probes: int, method: str = "hutchinson", seed: int = 0) -> Tensor:
    r"""Unbiased estimate of tr(A) from ``n_probes`` products with A (P, P). Returns a 0-d Tensor.

    - ``"hutchinson"``: (1/n) sum_j z_j^T A z_j, Rademacher z_j; variance 2 (||A||_F^2 - sum A_ii^2)/n.
    - ``"hutchpp"`` (Hutch++): n/3 products sketch Q = orth(A S); tr(Q^T A Q) (n/3 products) plus
      Hutchinson on (I - QQ^T) A (I - QQ^T) with the last n/3 probes. Exact when rank(A) <= n/3;
      error O(1/n) instead of O(1/sqrt n) for PSD A.
    - ``"xtrace"`` (XTrace, symmetric A): m = n/2 probes W, Y = A W = Q R, A Q (m products); for each
      i the leave-one-out basis Q_i = range(Y without column i) gives the estimate
      tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i, and the result is their mean.
      Exact when rank(A) < n/2. Requires n/2 <= P.
    """
    P, gen = _setup(op, n_probes, seed)
    if method == "hutchinson":
        Z = _probes(op, n_probes, gen)
        return (Z * (op @ Z)).sum() / n_probes
    if method == "hutchpp":
        if n_probes < 3:
            raise ValueError(f"method='hutchpp' needs n_probes >= 3, got {n_probes}")
        k = n_probes // 3
        S, G = _probes(op, k, gen), _probes(op, n_probes - 2 * k, gen)
        Q = torch.linalg.qr(op @ S).Q  # (P, k)
        G = G - Q @ (Q.mT @ G)  # (I - QQ^T) G
        return (Q * (op @ Q)).sum() + (G * (op @ G)).sum() / G.shape[1]
    if method == "xtrace":
        m = n_probes // 2
        if m < 2 or m > P:
            raise ValueError(
                f"method='xtrace' needs 4 <= n_probes <= 2 P, got {n_probes} (P = {P})"
            )
        W = _probes(op, m, gen)
        Y = op @ W  # (P, m)
        Q, S = _leave_one_out_basis(Y)
        Z = op @ Q  # A Q, (P, m)
        H = Q.mT @ Z  # Q^T A Q, (m, m)
        # tr(Q_i^T A Q_i) = tr(H) - s_i^T H s_i
        tr_basis = torch.diagonal(H).sum() - (S * (H @ S)).sum(0)
        # (I - Pi_i) w_i and A (I - Pi_i) w_i with Pi_i = Q (I - s_i s_i^T) Q^T, column-wise
        X = Q.mT @ W  # x_i = Q^T w_i
        C = X - S * (S * X).sum(0)  # (I - s_i s_i^T) x_i
        AP = Y - Z @ C  # A (I - Pi_i) w_i
        U = Q.mT @ AP
        PAP = AP - Q @ (U - S * (S * U).sum(0))  # (I - Pi_i) A (I - Pi_i) w_i
        return (tr_basis + (W * PAP).sum(0)).mean()
    raise ValueError(f"method must be 'hutchinson', 'hutchpp' or 'xtrace', got {method!r}")


def diagonal(op: Operator, n_probes: int, method: str = "hutchinson", seed: int = 0) -> Tensor:
    r"""Unbiased estimate of diag(A), shape (P,), from ``n_probes`` products with A (P, P).

    - ``"hutchinson"`` (Bekas et al.): (1/n) sum_j z_j * (A z_j) with Rademacher z_j (z_j^2 = 1).
    - ``"xdiag"`` (XDiag, symmetric A): m = n/2 probes W, Y = A W = Q R, A Q; with the leave-one-out
      projectors Pi_i = Q (I - s_i s_i^T) Q^T,
      diag = (1/m) sum_i [diag(Pi_i A) + w_i * ((I - Pi_i) A w_i) / w_i^2].
      Exact when rank(A) < n/2. Requires n/2 <= P.
    """
    P, gen = _setup(op, n_probes, seed)
    if method == "hutchinson":
        Z = _probes(op, n_probes, gen)
        return (Z * (op @ Z)).sum(1) / (Z * Z).sum(1)
    if method == "xdiag":
        m = n_probes // 2
        if m < 2 or m > P:
            raise ValueError(f"method='xdiag' needs 4 <= n_probes <= 2 P, got {n_probes} (P = {P})")
        W = _probes(op, m, gen)
        Y = op @ W
        Q, S = _leave_one_out_basis(Y)
        Z = op @ Q  # A Q = (Q^T A)^T for symmetric A
        QS, ZS = Q @ S, Z @ S
        # (1/m) sum_i diag(Pi_i A) = diag(Q Q^T A) - (1/m) diag(Q S S^T Q^T A)
        basis = (Q * Z).sum(1) - (QS * ZS).sum(1) / m
        V = Z.mT @ W  # Q^T A w_i
        comp = Y - Q @ (V - S * (S * V).sum(0))  # (I - Pi_i) A w_i
        return basis + (W * comp / (W * W)).sum(1) / m
    raise ValueError(f"method must be 'hutchinson' or 'xdiag', got {method!r}")


def frobenius_norm(op: Operator, n_probes: int, seed: int = 0) -> Tensor:
    r"""Estimate of ||A||_F = sqrt(tr(A^T A)) = sqrt(E ||A z||^2) for E[z z^T] = I, Rademacher z.

    The mean of ||A z_j||^2 over the ``n_probes`` probes is unbiased for ||A||_F^2; its square root
    (returned, 0-d) is consistent. For the exact value of a Fisher see ``fim_linops.frobenius_norm``.
    """
    _, gen = _setup(op, n_probes, seed)
    Z = _probes(op, n_probes, gen)
    return ((op @ Z) ** 2).sum().div(n_probes).sqrt()
