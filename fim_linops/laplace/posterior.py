r"""Laplace posterior over the parameters: its precision, samples and evidence.

Around the MAP theta*, p(theta | D) ~ N(theta*, Sigma) with precision
P = s G + P0, G = sum_n J_n^T H_n J_n (the GGN summed over the data, = N times the mean exact
Fisher of ``fl.fisher``), s = sigma_0^2 / sigma^2 for a Gaussian likelihood whose noise changes
(else 1) and P0 the prior precision (laplace-torch's convention). The GGN takes any ``fl.fisher``
structure; P keeps its exact algebra (:mod:`fim_linops.laplace.prior`).

The GLM predictive at new inputs is :class:`fim_linops.laplace.predictive.GLMPredictive`.

Evidence (MacKay; Immer et al. 2021):
log p(D) ~ log p(D | theta*) - 1/2 (log det P - log det P0 + theta*^T P0 theta*),
differentiable in P0 and sigma.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from fim_linops.algebra import sample as sample_gaussian
from fim_linops.data import call_model, iter_batches
from fim_linops.distributed import all_reduce_, resolve_group
from fim_linops.laplace import ggn
from fim_linops.laplace import prior as priors
from fim_linops.laplace.predictive import GLMPredictive
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Gaussian, Likelihood
from fim_linops.memory_guard import DEFAULT_MAX_BYTES
from fim_linops.options import BuildOptions
from fim_linops.positions import Positions, flat_mask
from fim_linops.sharding.gather import gathered
from fim_linops.state import preserved_state

#: the keyword arguments of ``fl.fisher`` that ``Laplace(**fisher_kwargs)`` passes on
FISHER_KWARGS = (
    "fisher_type", "mc_samples", "device", "dtype", "progress", "generator", "process_group",
    "kfac_approx", "strict",
)  # fmt: skip


class Laplace(GLMPredictive):
    r"""Laplace approximation around the model's current parameters (the MAP).

    Args:
        model: the trained network; left as found.
        data: the training data (DataLoader, iterable of (x, y) batches or one batch).
        likelihood: "categorical", "gaussian", "bernoulli" or an ``fl.Likelihood``
            (``fl.Gaussian(sigma)`` for the observation noise).
        structure: the GGN structure, any of ``fl.fisher``'s ("kfac", "ekfac", "diag",
            "block_diag", "dense", "lowrank" with ``rank``, ...).
        prior_precision: scalar, per layer (L,) or per parameter (P,).
        params: the parameters the posterior is over (None: all trainable ones).
        rank: for structure="lowrank".
        batch_size: examples per batch in predictive computations.
        max_bytes: memory guard, checked before allocating: the dense (P x P) or block-diagonal
            posterior, the joint predictive covariance (N*C x N*C) and the per-batch Jacobian
            (batch_size*C x P) of the dense/block_diag predictive; over it a ``ValueError``
            names what fits (None: no limit).
        sharded: build the GGN with ``fl.sharding.fisher_sharded`` (structure "diag", "kfac"
            or "ekfac", scalar prior precision): each rank of an FSDP2 model keeps only its share
            of the statistics, and the posterior's methods become collectives (every rank calls
            them); :mod:`fim_linops.laplace.ggn`.
        **fisher_kwargs: passed on to ``fl.fisher`` (e.g. ``fisher_type="mc"`` with
            ``mc_samples`` and ``generator`` for a sampled GGN, ``kfac_approx``, ``process_group``:
            with torch.distributed each rank passes its own shard of ``data``; the GGN, the
            example count and the fit term are summed over the ranks).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        likelihood: str | Likelihood = "categorical",
        structure: str = "kfac",
        prior_precision: float | Tensor = 1.0,
        params: Any = None,
        rank: int | None = None,
        batch_size: int = 256,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        sharded: bool = False,
        **fisher_kwargs: Any,
    ):
        unknown = sorted(set(fisher_kwargs) - set(FISHER_KWARGS))
        if unknown:
            raise TypeError(
                f"Laplace() got unexpected keyword arguments {unknown}; the keyword arguments "
                f"passed on to fl.fisher are {list(FISHER_KWARGS)}"
            )
        with gathered(model) as model:  # FSDP2: full parameters; DDP: its .module
            self.model = model
            self.layout = ParamLayout.from_model(model, params)
            # the exact GGN unless fisher_type="mc" asks for a sampled one (e.g. vocabulary-size
            # per-token outputs, whose exact GGN needs T (V - 1) columns per sequence)
            self.options = BuildOptions.of(
                likelihood,
                params=self.layout.params,
                rank=rank,
                max_bytes=max_bytes,
                batch_size=batch_size,
                **fisher_kwargs,
            )
            self.likelihood = self.options.likelihood
            p0 = self.layout.entries[0].param
            self.dtype, self.device = p0.dtype, p0.device
            ggn.check_structure_memory(structure, self.layout, self.dtype, max_bytes)
            self.mean = self.layout.vector()
            counts, fit = self._fit_statistics(data)
            # torch.distributed: each rank passes its shard; the counts and the fit term are summed
            # over the ranks (the GGN is all-reduced by fl.fisher with the same process group)
            group = resolve_group(self.options.process_group)
            self._fit, counts = all_reduce_([fit, counts], group)
            # examples, fl.fisher's normaliser (examples, or kept positions for positions="mean"),
            # kept outputs (the Gaussian's normalising constant)
            self.n_data, normaliser, self._n_kept_outputs = (int(c) for c in counts.round().long())
            mean_fisher = ggn.mean_fisher(model, data, structure, self.options, sharded, rank)
            self.ggn = mean_fisher * float(normaliser)  # sum over the data (and positions)
            self.structure = structure
            self.sigma0 = (
                torch.as_tensor(self.likelihood.sigma, dtype=self.dtype, device=self.device)
                if isinstance(self.likelihood, Gaussian)
                else None
            )
            self.sigma = self.sigma0
            self.prior_precision = prior_precision
            self._evals: Tensor | None = None

    @property
    def batch_size(self) -> int | None:
        """Examples per batch of the predictive (``options.batch_size``)."""
        return self.options.batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self.options = self.options.but(batch_size=value)

    @property
    def max_bytes(self) -> int | None:
        """The memory guard of the posterior and the predictive (``options.max_bytes``)."""
        return self.options.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        self.options = self.options.but(max_bytes=value)

    # -- hyper-parameters ------------------------------------------------------------------------
    @property
    def prior_precision(self) -> Tensor:
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._prior, self._kind = priors.parse_prior(value, self.layout, self.dtype, self.device)
        self._evals = None
        self._check_prior()

    def _check_prior(self) -> None:
        """Raise early when the structure cannot take this kind of prior precision."""
        priors.precision(
            self.ggn,
            torch.ones((), dtype=self.dtype, device=self.device),
            self._prior,
            self._kind,
            self.layout,
        )

    def _scale(self, sigma: Tensor | None) -> Tensor:
        if self.sigma0 is None or sigma is None:
            return torch.ones((), dtype=self.dtype, device=self.device)
        return (self.sigma0 / sigma) ** 2

    @property
    def posterior_precision(self) -> LinearOperator:
        """P = s G + P0 (P, P), structured."""
        return priors.precision(
            self.ggn, self._scale(self.sigma), self._prior, self._kind, self.layout
        )

    # -- data statistics -------------------------------------------------------------------------
    def _fit_statistics(self, data: Any) -> tuple[Tensor, Tensor]:
        """Counts (examples, fl.fisher's normaliser, kept outputs) as a float64 tensor (3,) and, at
        theta*: the sum of squared residuals (Gaussian) or of the nll, over the kept positions
        (labels equal to ignore_index and NaN targets drop theirs)."""
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        lik = self.likelihood
        self._n_outputs = 0
        with preserved_state(self.model), torch.no_grad():
            for x, y in iter_batches(data, self.device, self.dtype, True, self.model):
                f = lik.check_output(call_model(self.model, x))
                assert y is not None  # need_targets=True
                y = lik.check_target(f, y)
                n, width = f.shape[0], lik.width or f.shape[1]
                mask = lik.position_mask(f, y) if hasattr(lik, "position_mask") else None
                kept = (
                    torch.ones_like(f, dtype=torch.float64)
                    if mask is None
                    else flat_mask(mask, width).to(torch.float64)
                )  # (N, T*C)
                if isinstance(lik, Gaussian):
                    total = total + ((torch.nan_to_num(y) - f) ** 2 * kept.to(f.dtype)).sum()
                else:
                    total = total + lik.nll(f, y).sum()
                mean = getattr(lik, "positions", None) is Positions.MEAN
                terms = kept.sum() / width if mean else counts.new_tensor(n)
                counts += torch.stack([counts.new_tensor(n), terms, kept.sum()])
                self._n_outputs = f.shape[1]
        return counts, total

    def log_likelihood(self, sigma: Tensor | None = None) -> Tensor:
        """log p(D | theta*), differentiable in sigma for a Gaussian likelihood."""
        if self.sigma0 is None:
            return -self._fit
        sigma = self.sigma if sigma is None else sigma
        assert sigma is not None  # a Gaussian likelihood has a sigma
        nc = self._n_kept_outputs
        return -self._fit / (2 * sigma**2) - nc * torch.log(sigma * math.sqrt(2 * math.pi))

    # -- evidence --------------------------------------------------------------------------------
    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma: Tensor | None = None
    ) -> Tensor:
        r"""log p(D | theta*) - 1/2 (log det P - log det P0 + theta*^T P0 theta*), differentiable
        in ``prior_precision`` (same kind as the stored one) and ``sigma`` (Gaussian)."""
        prior = self._prior if prior_precision is None else prior_precision
        kind = self._kind
        if prior_precision is not None:
            _, kind = priors.parse_prior(prior.detach(), self.layout, self.dtype, self.device)
        sigma = self.sigma if sigma is None else sigma
        if self._evals is None or kind is not self._kind:
            evals = priors.eigenvalues(self.ggn, kind)
            if kind is self._kind:
                self._evals = evals
        else:
            evals = self._evals
        vec = priors.expand(prior, kind, self.layout)
        ld_post = priors.logdet(self.ggn, evals, self._scale(sigma), prior, kind, self.layout)
        ld_prior = torch.log(vec).sum()
        scatter = (vec * self.mean**2).sum()
        return self.log_likelihood(sigma) - 0.5 * (ld_post - ld_prior + scatter)

    def optimize_prior_precision(
        self, n_steps: int = 100, lr: float = 0.1, sigma: bool = False
    ) -> Laplace:
        """Maximise the evidence in log prior precision (and log sigma, Gaussian only) by Adam;
        the result is stored (``prior_precision``, ``sigma``). Returns self."""
        log_prior = self._prior.detach().log().clone().requires_grad_()
        variables = [log_prior]
        log_sigma = None
        if sigma:
            if self.sigma0 is None:
                raise ValueError("sigma=True needs a Gaussian likelihood")
            assert self.sigma is not None
            log_sigma = self.sigma.detach().log().clone().requires_grad_()
            variables.append(log_sigma)
        opt = torch.optim.Adam(variables, lr=lr)
        for _ in range(n_steps):
            opt.zero_grad()
            s = None if log_sigma is None else log_sigma.exp()
            loss = -self.log_marginal_likelihood(log_prior.exp(), s)
            loss.backward()
            opt.step()
        self.prior_precision = log_prior.detach().exp()
        if log_sigma is not None:
            self.sigma = log_sigma.detach().exp()
        return self

    # -- samples -----------------------------------------------------------------------------------
    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """n parameter samples (n, P) from N(theta*, P^-1), through the exact inverse root."""
        return self.mean + sample_gaussian(self.posterior_precision, n, generator=generator)

    def __repr__(self) -> str:
        return (
            f"Laplace(structure={self.structure!r}, P={self.layout.numel}, N={self.n_data}, "
            f"prior={self._kind.value})"
        )
