"""fim_linops: Fisher, Gauss-Newton and NTK matrices of PyTorch models as LinearOperators."""

from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, get_likelihood

__version__ = "0.1.0"

__all__ = [
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "ParamLayout",
    "get_likelihood",
]
