"""FishLeg: natural gradient with a learned inverse Fisher Q(lambda) ~ (F + gamma I)^-1.

``FishLeg`` is the optimiser; its ``inverse_fisher`` is a block-diagonal LinearOperator of the
per-layer parameterisations ``KronQ``, ``KronDiagQ``, ``KronSumQ`` and ``DiagQ``.
``fisher_vector_product`` is the exact GGN product (jvp, output Hessian, vjp) it trains on.
"""

from fim_linops.fishleg.block_diag import BlockDiagonal
from fim_linops.fishleg.diag import DiagQ
from fim_linops.fishleg.fvp import fisher_vector_product
from fim_linops.fishleg.init import kfac_factors
from fim_linops.fishleg.kron import KronDiagQ, KronQ, KronRoot
from fim_linops.fishleg.kron_sum import KronSumQ, KronSumRoot
from fim_linops.fishleg.optimizer import FishLeg

__all__ = [
    "BlockDiagonal",
    "DiagQ",
    "FishLeg",
    "KronDiagQ",
    "KronQ",
    "KronRoot",
    "KronSumQ",
    "KronSumRoot",
    "fisher_vector_product",
    "kfac_factors",
]
