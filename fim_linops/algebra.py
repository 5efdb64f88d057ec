r"""Algebra on Fisher operators: powers, sums across structures, scaling, damping and samples.

* ``alpha * F`` and ``F.add_diagonal(delta)`` keep the structure (and its exact algebra);
* :func:`power`: (F + delta I)^alpha for every structure whose eigendecomposition is structural
  (dense, block_diag, diag, kfac, ekfac, lowrank, and mixes of those);
* :func:`add`: F_1 + F_2 in the tightest structure that holds the sum exactly (diag + diag = diag,
  dense + dense, block_diag + block_diag, lowrank + lowrank = lowrank of rank <= k_1 + k_2,
  kfac/kron_sum + kfac/kron_sum = kron_sum with the terms concatenated, quasi_diag + quasi_diag,
  mixes with the same groups group by group), else a :class:`Sum` with CG solves;
* :func:`sample`: draws from N(0, (F + delta I)^-1) through the exact inverse root.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import EigenOperator, FisherOperator
from fim_linops.operators.block_diag import BlockDiag
from fim_linops.operators.dense import Dense
from fim_linops.operators.diag import Diag
from fim_linops.operators.kfac import KFAC
from fim_linops.operators.kron_sum import KronSum
from fim_linops.operators.lowrank import LowRank
from fim_linops.operators.mixed import Mixed
from fim_linops.operators.quasi_diag import QuasiDiag
from fim_linops.operators.sum import Power, Sum


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


def _kron_terms(F: FisherOperator) -> list[Tensor] | None:
    if isinstance(F, KFAC):
        return [t[None] for t in F.factors]
    if isinstance(F, KronSum):
        return list(F.factors)
    return None


def add(F1: LinearOperator, F2: LinearOperator) -> LinearOperator:
    """F1 + F2 in the tightest structure that represents the sum exactly (see the module doc)."""
    if not (isinstance(F1, FisherOperator) and isinstance(F2, FisherOperator)):
        return F1 + F2
    if F1.shape != F2.shape:
        raise ValueError(
            f"cannot add Fisher operators of shapes {tuple(F1.shape)} and {tuple(F2.shape)}"
        )
    d = F1.damping + F2.damping
    if isinstance(F1, Diag) and isinstance(F2, Diag):
        return Diag(F1.diag + F2.diag, damping=d)
    if isinstance(F1, Dense) and isinstance(F2, Dense):
        return Dense(F1.matrix + F2.matrix, damping=d)
    if isinstance(F1, BlockDiag) and isinstance(F2, BlockDiag) and F1.offsets == F2.offsets:
        return BlockDiag(
            *[a + b for a, b in zip(F1.blocks, F2.blocks, strict=True)], damping=d, names=F1.names
        )
    if isinstance(F1, LowRank) and isinstance(F2, LowRank):
        # [U1 S1^{1/2}, U2 S2^{1/2}] = W s V^T  =>  F1 + F2 = W diag(s^2) W^T
        roots = torch.cat([F1.u * F1.evals.sqrt(), F2.u * F2.evals.sqrt()], dim=1)
        w, s, _ = torch.linalg.svd(roots, full_matrices=False)
        return LowRank(w, s**2, damping=d)
    if isinstance(F1, QuasiDiag) and isinstance(F2, QuasiDiag) and F1.specs == F2.specs:
        cross = [a + b for a, b in zip(F1.cross, F2.cross, strict=True)]
        return QuasiDiag(F1.diag + F2.diag, *cross, specs=F1.specs, damping=d)
    t1, t2 = _kron_terms(F1), _kron_terms(F2)
    if t1 is not None and t2 is not None and F1.specs == F2.specs:
        return KronSum(
            *[torch.cat([a, b]) for a, b in zip(t1, t2, strict=True)], specs=F1.specs, damping=d
        )
    if isinstance(F1, Mixed) and isinstance(F2, Mixed) and F1.spans == F2.spans:
        ops = [add(a, b) for a, b in zip(F1.ops, F2.ops, strict=True)]
        return Mixed(*ops, spans=F1.spans, structures=F1.structures, damping=d)
    return Sum(F1, F2)


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
