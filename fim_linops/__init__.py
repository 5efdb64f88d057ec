"""fim_linops: Fisher, Gauss-Newton and NTK matrices of PyTorch models as LinearOperators."""

from fim_linops import operators
from fim_linops.engine import FisherType
from fim_linops.fisher import fisher
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, get_likelihood
from fim_linops.metrics import frobenius_norm, quad, trace
from fim_linops.operators import KFAC, BlockDiag, Dense, Diag, FisherOperator, Implicit
from fim_linops.structures import Structure

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "Bernoulli",
    "BlockDiag",
    "Categorical",
    "Dense",
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
    "frobenius_norm",
    "get_likelihood",
    "quad",
    "trace",
]
