r"""Laplace posterior over the parameters and its linearised (GLM) predictive.

Around the MAP theta*, p(theta | D) ~ N(theta*, Sigma) with precision
P = s G + P0, G = sum_n J_n^T H_n J_n (the GGN summed over the data, = N times the mean exact
Fisher of ``fl.fisher``), s = sigma_0^2 / sigma^2 for a Gaussian likelihood whose noise changes
(else 1) and P0 the prior precision (laplace-torch's convention). The GGN takes any ``fl.fisher``
structure; P keeps its exact algebra (:mod:`fim_linops.laplace.prior`).

GLM predictive at inputs x (N examples, C outputs): f(x) ~ N(f(x; theta*), J Sigma J^T), J the
(N*C, P) Jacobian; per example (N, C, C), or jointly (N*C, N*C). Computed in batches of examples,
one forward and one batched backward of the C output columns per batch:

* diag, KFAC, EKFAC posteriors (scalar or per-layer priors): layer by layer in the basis where
  Sigma_l is diagonal, from the layer inputs a and output gradients g (Linear) or the layer's
  per-example gradients (other layers), never the N x C x P Jacobian
  (:mod:`fim_linops.laplace.structured`);
* lowrank: Woodbury, (J U) D (J U)^T + Theta / delta, J U by forward mode;
* dense, block_diag, mixed: per batch the Jacobian rows from the layer rules (batch x C x P),
  one exact solve with P.

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
from fim_linops.data import batch_size as n_examples
from fim_linops.data import call_model, iter_batches
from fim_linops.distributed import all_reduce_, resolve_group
from fim_linops.engine import Engine
from fim_linops.engine.dropout import warn_active_dropout
from fim_linops.engine.gram import gram_per_example, side
from fim_linops.engine.outputs import jacobian_rows, outputs_engine
from fim_linops.laplace import ggn, structured
from fim_linops.laplace import prior as priors
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, get_likelihood
from fim_linops.memory_guard import DEFAULT_MAX_BYTES, check_bytes
from fim_linops.ntk import _jacobian_op, split_inputs
from fim_linops.operators import LowRank
from fim_linops.operators.jacobian import Outputs
from fim_linops.operators.ntk import gram_of
from fim_linops.positions import Positions, flat_mask
from fim_linops.sharding.gather import gathered, on_gathered_model
from fim_linops.state import preserved_state


class Laplace:
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
        with gathered(model) as model:  # FSDP2: full parameters; DDP: its .module
            self.model = model
            self.likelihood = get_likelihood(likelihood)
            self.layout = ParamLayout.from_model(model, params)
            self.batch_size = batch_size
            self.max_bytes = max_bytes
            p0 = self.layout.entries[0].param
            self.dtype, self.device = p0.dtype, p0.device
            ggn.check_structure_memory(structure, self.layout, self.dtype, max_bytes)
            self.mean = self.layout.vector()
            counts, fit = self._fit_statistics(data)
            # torch.distributed: each rank passes its shard; the counts and the fit term are summed
            # over the ranks (the GGN is all-reduced by fl.fisher with the same process group)
            group = resolve_group(fisher_kwargs.get("process_group"))
            self._fit, counts = all_reduce_([fit, counts], group)
            # examples, fl.fisher's normaliser (examples, or kept positions for positions="mean"),
            # kept outputs (the Gaussian's normalising constant)
            self.n_data, normaliser, self._n_kept_outputs = (int(c) for c in counts.round().long())
            # the exact GGN unless fisher_type="mc" asks for a sampled one (e.g. vocabulary-size
            # per-token outputs, whose exact GGN needs T (V - 1) columns per sequence)
            mean_fisher = ggn.mean_fisher(
                model,
                data,
                self.likelihood,
                structure,
                self.layout.params,
                rank,
                max_bytes,
                sharded,
                fisher_kwargs,
            )
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
            for x, y in iter_batches(data, self.device, self.dtype, need_targets=True):
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

    # -- samples and predictive ------------------------------------------------------------------
    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """n parameter samples (n, P) from N(theta*, P^-1), through the exact inverse root."""
        return self.mean + sample_gaussian(self.posterior_precision, n, generator=generator)

    def _forward(self, x: Any) -> Tensor:
        with preserved_state(self.model), torch.no_grad():
            return Outputs().check_output(call_model(self.model, x))

    @on_gathered_model
    def predictive(self, x: Any, joint: bool = False) -> tuple[Tensor, Tensor]:
        r"""GLM predictive: mean f(x; theta*) (N, C) and covariance J Sigma J^T, per example
        (N, C, C) or, with ``joint``, (N*C, N*C) (row n*C + c)."""
        warn_active_dropout(self.model, "the predictive")
        if joint:
            nc = n_examples(x) * self._n_outputs
            check_bytes(
                "the joint predictive covariance",
                (nc, nc),
                self.dtype,
                self.max_bytes,
                "use joint=False (per-example (N, C, C) covariances) or fewer inputs",
            )
        if isinstance(self.ggn, LowRank):
            return self._predictive_lowrank(x, joint)
        prec = self.posterior_precision
        covs_l = structured.layer_covariances(prec, self.layout)
        if covs_l is not None:
            return self._predictive_structured(x, joint, covs_l)
        batches = split_inputs(x, self.batch_size)
        check_bytes(
            "the Jacobian of one batch",
            (n_examples(batches[0]) * self._n_outputs, self.layout.numel),
            self.dtype,
            self.max_bytes,
            "use a smaller batch_size, or structure='kfac', 'diag' or 'lowrank'",
        )
        mean = torch.cat([self._forward(xb) for xb in batches])
        covs, jacs = [], []
        with preserved_state(self.model):
            engine = self._engine(batches)
            for j in jacobian_rows(engine, batches):  # (n*C, P) per batch
                c = mean.shape[1]
                n = j.shape[0] // c
                if joint:
                    jacs.append(j)
                    continue
                s = prec.solve(j.T)  # (P, n*C)
                # n: example, c/d: outputs, p: parameter
                covs.append(
                    torch.einsum("ncp,ndp->ncd", j.reshape(n, c, -1), s.T.reshape(n, c, -1))
                )
        if joint:
            j = torch.cat(jacs)
            return mean, j @ prec.solve(j.T)
        return mean, torch.cat(covs)

    def _engine(self, batches: list[Any]) -> Engine:
        """The engine of the outputs' Jacobians for these batches, with the first-batch checks
        of ``fl.fisher`` run on them first (:func:`fim_linops.engine.outputs.outputs_engine`): a layer that
        the GGN took through torch.func goes there for the predictive too."""
        return outputs_engine(self.model, self.layout, Outputs(), batches)

    def _predictive_structured(
        self, x: Any, joint: bool, covs: list[structured.LayerCov]
    ) -> tuple[Tensor, Tensor]:
        """Diag/KFAC/EKFAC posteriors: layer by layer in Sigma's eigenbasis, from each batch's
        captured (a, g) or per-layer per-example gradients (:mod:`structured`)."""
        batches = split_inputs(x, self.batch_size)
        mean = torch.cat([self._forward(xb) for xb in batches])
        parts: list = []
        with preserved_state(self.model):
            engine = self._engine(batches)
            for res in engine.run([(xb, None) for xb in batches]):
                feats = structured.batch_features(res, covs)
                parts.append((res.n, res.k, feats) if joint else structured.per_example(feats))
        if joint:
            return mean, structured.joint(parts, self.dtype, self.device)
        return mean, torch.cat(parts)

    def _predictive_lowrank(self, x: Any, joint: bool) -> tuple[Tensor, Tensor]:
        r"""Low-rank GGN s U diag(lambda) U^T with a scalar prior delta, by Woodbury:
        Sigma = U diag(1/(s lambda + delta) - 1/delta) U^T + I / delta, so
        J Sigma J^T = (J U) D (J U)^T + Theta / delta with J U by forward mode (k tangents) and
        the NTK Theta from the per-layer Gram rules: no Jacobian is formed."""
        delta = self._prior
        d = 1 / (self._scale(self.sigma) * self.ggn.evals + delta) - 1 / delta  # (k,)
        batches = split_inputs(x, self.batch_size)
        jac = _jacobian_op(self.model, self.layout, x, Outputs(), self.batch_size, self.max_bytes)
        with preserved_state(self.model):
            ju = jac.jvp(self.ggn.u)  # (N*C, k)
        mean = torch.cat([self._forward(xb) for xb in batches])
        n, c = mean.shape
        if joint:
            theta = gram_of(jac, None, trace=False)
            return mean, (ju * d) @ ju.T + theta / delta
        ju3 = ju.reshape(n, c, -1)
        with preserved_state(self.model):
            engine = self._engine(batches)
            blocks = []
            for res in engine.run([(xb, None) for xb in batches]):
                blocks.append(gram_per_example(engine, side(res)))  # (n, C, C)
        theta = torch.cat(blocks)  # (N, C, C)
        return mean, torch.einsum("nck,k,ndk->ncd", ju3, d, ju3) + theta / delta

    def predictive_probs(
        self,
        x: Any,
        link_approx: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Class probabilities of the GLM predictive for categorical (N, C) or Bernoulli (N,)
        likelihoods: "probit" (softmax/sigmoid of f / sqrt(1 + pi/8 var)) or "mc" (average
        over ``n_samples`` samples f ~ N(mean, cov) per example). Per-position outputs give
        (N, T, C) (categorical, softmax per position; the samples are joint over the positions of
        an example) or (N, T) (Bernoulli)."""
        lik = self.likelihood
        if not isinstance(lik, (Categorical, Bernoulli)):
            raise ValueError(
                "predictive_probs is for classification; use predictive() for regression"
            )
        mean, cov = self.predictive(x)  # (N, T*C), (N, T*C, T*C)
        seq, width = lik.sequence, lik.width or mean.shape[-1]

        def link(t: Tensor) -> Tensor:  # (..., N, T*C) -> probabilities
            if isinstance(lik, Bernoulli):
                return torch.sigmoid(t)
            if seq:  # (..., N, T, C): softmax per position
                return torch.softmax(t.reshape(*t.shape[:-1], -1, width), -1)
            return torch.softmax(t, -1)

        if link_approx == "probit":
            var = cov.diagonal(dim1=-2, dim2=-1)
            probs = link(mean / torch.sqrt(1 + math.pi / 8 * var))
        elif link_approx == "mc":
            lam, vecs = torch.linalg.eigh(cov)  # PSD root, robust to singular covariances
            root = vecs * lam.clamp_min(0).sqrt()[:, None, :]
            z = torch.randn(
                n_samples, *mean.shape, dtype=mean.dtype, device=mean.device, generator=generator
            )
            f = mean + torch.einsum("ncd,snd->snc", root, z)
            probs = link(f).mean(0)
        else:
            raise ValueError(f"unknown link_approx {link_approx!r}; use 'probit' or 'mc'")
        return probs[:, 0] if isinstance(lik, Bernoulli) and not seq else probs

    __call__ = predictive_probs

    def __repr__(self) -> str:
        return (
            f"Laplace(structure={self.structure!r}, P={self.layout.numel}, N={self.n_data}, "
            f"prior={self._kind.value})"
        )
