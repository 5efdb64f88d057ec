r"""Likelihoods p(y | f) on the model output f, and what the Fisher needs of them.

One file a job: :mod:`.base` (the :class:`Likelihood` interface, per-position outputs and
:func:`tensor_output`), :mod:`.categorical`, :mod:`.gaussian`, :mod:`.bernoulli`; this module
holds the lookup by name (:func:`get_likelihood`).
"""

from __future__ import annotations

from fim_linops.likelihoods.base import Likelihood, tensor_output
from fim_linops.likelihoods.bernoulli import Bernoulli
from fim_linops.likelihoods.categorical import Categorical
from fim_linops.likelihoods.gaussian import Gaussian

__all__ = [
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "get_likelihood",
    "tensor_output",
]

_BY_NAME: dict[str, type[Likelihood]] = {
    "categorical": Categorical,
    "classification": Categorical,
    "cross_entropy": Categorical,
    "gaussian": Gaussian,
    "regression": Gaussian,
    "mse": Gaussian,
    "bernoulli": Bernoulli,
    "binary": Bernoulli,
}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Return a :class:`Likelihood` from an instance or a name ("categorical", "gaussian", "bernoulli")."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        cls = _BY_NAME.get(likelihood.lower())
        if cls is None:
            raise ValueError(
                f"unknown likelihood {likelihood!r}; use 'categorical', 'gaussian', 'bernoulli' "
                "or an fl.Likelihood instance such as fl.Gaussian(sigma=0.1)"
            )
        return cls()
    raise TypeError(
        f"likelihood must be a name or an fl.Likelihood instance, got {type(likelihood).__name__}"
    )
