"""Spectral tools for any symmetric ``LinearOperator``: Lanczos eigenpairs, stochastic Lanczos
quadrature densities, and randomised trace / diagonal / Frobenius-norm estimators."""

from fim_linops.spectral.density import SpectralDensity, density
from fim_linops.spectral.estimators import diagonal, frobenius_norm, trace
from fim_linops.spectral.lanczos import LanczosRecurrence, lanczos

__all__ = [
    "LanczosRecurrence",
    "SpectralDensity",
    "density",
    "diagonal",
    "frobenius_norm",
    "lanczos",
    "trace",
]
