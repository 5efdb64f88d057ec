"""fim_linops: Fisher, Gauss-Newton and NTK matrices of PyTorch models as LinearOperators."""

from fim_linops import algebra, gp, laplace, operators, spectral
from fim_linops.algebra import power, sample
from fim_linops.compare import Comparison, compare
from fim_linops.engine import FisherType
from fim_linops.fisher import fisher
from fim_linops.fishleg import FishLeg
from fim_linops.influence import influence, self_influence, top_influences
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, get_likelihood
from fim_linops.memory_guard import MemoryLimitError
from fim_linops.metrics import frobenius_norm, quad, trace
from fim_linops.ntk import jacobian, ntk
from fim_linops.operators import (
    EKFAC,
    KFAC,
    BlockDiag,
    Dense,
    Diag,
    FisherOperator,
    Implicit,
    KronSum,
    LowRank,
    Mixed,
    Power,
    QuasiDiag,
    Sum,
)
from fim_linops.scipy import to_scipy
from fim_linops.solvers import CGInfo, cg, ewc_penalty, natural_gradient
from fim_linops.structures import Structure

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "KFAC",
    "KronSum",
    "LowRank",
    "MemoryLimitError",
    "Mixed",
    "Power",
    "QuasiDiag",
    "Sum",
    "algebra",
    "power",
    "sample",
    "spectral",
    "compare",
    "Comparison",
    "gp",
    "laplace",
    "jacobian",
    "ntk",
    "CGInfo",
    "cg",
    "ewc_penalty",
    "natural_gradient",
    "to_scipy",
    "Bernoulli",
    "BlockDiag",
    "Categorical",
    "Dense",
    "FishLeg",
    "Diag",
    "FisherOperator",
    "FisherType",
    "Gaussian",
    "Implicit",
    "Likelihood",
    "ParamLayout",
    "operators",
    "Structure",
    "fisher",
    "influence",
    "self_influence",
    "top_influences",
    "frobenius_norm",
    "get_likelihood",
    "quad",
    "trace",
]
