r"""F_1 + F_2 of two Fisher operators in the tightest structure that holds the sum exactly.

diag + diag = diag, dense + dense, block_diag + block_diag (same blocks), lowrank + lowrank =
lowrank of rank <= k_1 + k_2, kfac/kron_sum + kfac/kron_sum = kron_sum with the terms
concatenated (same layers), quasi_diag + quasi_diag (same layers), mixes with the same groups
group by group; else a :class:`Sum` with CG solves. The dampings add.

:func:`add` is the rule of ``F1 + F2`` (``FisherOperator.__add__`` dispatches through
:func:`fim_linops.operators.base.register_sum`, so the base class imports none of the structures);
this module registers it on import, and the operators package imports this module, so the rule is
in place as soon as any operator can exist. Public as :func:`fim_linops.algebra.add`.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import FisherOperator, register_sum
from fim_linops.operators.block_diag import BlockDiag
from fim_linops.operators.dense import Dense
from fim_linops.operators.diag import Diag
from fim_linops.operators.kfac import KFAC
from fim_linops.operators.kron_sum import KronSum
from fim_linops.operators.lowrank import LowRank
from fim_linops.operators.mixed import Mixed
from fim_linops.operators.quasi_diag import QuasiDiag
from fim_linops.operators.sum import Sum


def _kron_terms(F: FisherOperator) -> list[Tensor] | None:
    if isinstance(F, KFAC):
        return [t[None] for t in F.factors]
    if isinstance(F, KronSum):
        return list(F.factors)
    return None


@register_sum
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
