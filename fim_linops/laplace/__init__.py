"""Laplace posteriors over network parameters: structured posterior precision, samples, the
linearised (GLM) predictive and the marginal likelihood."""

from fim_linops.laplace.posterior import Laplace
from fim_linops.laplace.prior import PriorKind

__all__ = ["Laplace", "PriorKind"]
