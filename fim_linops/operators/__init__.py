"""One LinearOperator subclass per structure."""

from fim_linops.operators import addition  # noqa: F401  (registers the rule of F1 + F2)
from fim_linops.operators.base import EigenOperator, FisherOperator
from fim_linops.operators.block_diag import BlockDiag
from fim_linops.operators.dense import Dense
from fim_linops.operators.diag import Diag
from fim_linops.operators.ekfac import EKFAC
from fim_linops.operators.implicit import Implicit
from fim_linops.operators.kfac import KFAC
from fim_linops.operators.kron import KronBasis, KronSpec
from fim_linops.operators.kron_sum import KronSum
from fim_linops.operators.lowrank import HouseholderBasis, LowRank
from fim_linops.operators.mixed import GroupBlocks, Mixed
from fim_linops.operators.quasi_diag import QuasiDiag, QuasiSpec
from fim_linops.operators.sum import Power, Sum, SymmetricPower

__all__ = [
    "KFAC",
    "BlockDiag",
    "Dense",
    "Diag",
    "EigenOperator",
    "FisherOperator",
    "Implicit",
    "KronBasis",
    "KronSpec",
]
__all__ += [
    "EKFAC",
    "GroupBlocks",
    "HouseholderBasis",
    "KronSum",
    "LowRank",
    "Mixed",
    "Power",
    "QuasiDiag",
    "QuasiSpec",
    "Sum",
    "SymmetricPower",
]
