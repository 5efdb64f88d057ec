r"""Algebra on Fisher operators: powers, sums across structures, scaling, damping and samples.

* ``alpha * F`` and ``F.add_diagonal(delta)`` keep the structure (and its exact algebra);
* :func:`power`: (F + delta I)^alpha for every structure whose eigendecomposition is structural
  (dense, block_diag, diag, kfac, ekfac, lowrank, and mixes of those);
* :func:`add` (``F1 + F2``): F_1 + F_2 in the tightest structure that holds the sum exactly (diag
  + diag = diag, dense + dense, block_diag + block_diag, lowrank + lowrank = lowrank of rank
  <= k_1 + k_2, kfac/kron_sum + kfac/kron_sum = kron_sum with the terms concatenated, quasi_diag
  + quasi_diag, mixes with the same groups group by group), else a :class:`Sum` with CG solves
  (:mod:`fim_linops.operators.addition`);
* :func:`sample`: draws from N(0, (F + delta I)^-1) through the exact inverse root.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.addition import add
from fim_linops.operators.base import EigenOperator, FisherOperator
from fim_linops.operators.kfac import KFAC
from fim_linops.operators.kron_sum import KronSum
from fim_linops.operators.mixed import Mixed
from fim_linops.operators.sum import Power

__all__ = ["add", "power", "sample"]


def power(F: LinearOperator, alpha: float) -> FisherOperator:
    r"""(F + delta I)^alpha exactly, as an operator with the same eigenvectors (alpha = -1: the
    inverse; 1/2: the symmetric square root; -1/2: the inverse square root; any real alpha).

    Negative powers of a singular undamped F are pseudo-inverse powers."""
    alpha = float(alpha)
    if isinstance(F, EigenOperator):
        return Power(F, alpha=alpha)
    if isinstance(F, Mixed):
        ops = [power(op.add_diagonal(F.damping), alpha) for op in F.ops]
        return Mixed(*ops, spans=F.spans, structures=F.structures)
    if isinstance(F, KronSum) and all(r == 1 for r in F.ranks):
        return power(_kron_sum_as_kfac(F), alpha)
    raise TypeError(
        f"fl.power needs a structural eigendecomposition; {type(F).__name__} has none. Use "
        "structure='dense', 'block_diag', 'diag', 'kfac', 'ekfac' or 'lowrank' (or F.solve for alpha=-1)"
    )


def _kron_sum_as_kfac(F: KronSum) -> KFAC:
    factors = [t[0] for t in F.factors]
    return KFAC(*factors, specs=F.specs, damping=F.damping)


def sample(
    F: LinearOperator,
    n: int = 1,
    damping: float | Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""n samples (n, P) from N(0, (F + damping I)^-1): S z with S S^T = (F + damping I)^-1 the
    operator's inverse root (exact for every structured operator) and z ~ N(0, I)."""
    Fd = (
        F.add_diagonal(torch.as_tensor(damping, dtype=F.dtype, device=F.device))
        if float(damping)
        else F
    )
    s = Fd.root_inv_decomposition().root
    z = torch.randn(s.shape[-1], n, dtype=F.dtype, device=F.device, generator=generator)
    return (s @ z).T
