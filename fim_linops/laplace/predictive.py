r"""The GLM (linearised) predictive of a Laplace posterior, the second job of
:class:`fim_linops.laplace.Laplace` (the first, the posterior itself, is in ``posterior.py``).

At inputs x (N examples, C outputs): f(x) ~ N(f(x; theta*), J Sigma J^T), J the (N*C, P) Jacobian
and Sigma = P^-1 the posterior covariance; per example (N, C, C), or jointly (N*C, N*C). Computed
in batches of ``options.batch_size`` examples, one forward and one batched backward of the C
output columns per batch:

* diag, KFAC, EKFAC posteriors (scalar or per-layer priors): layer by layer in the basis where
  Sigma_l is diagonal, from the layer inputs a and output gradients g (Linear) or the layer's
  per-example gradients (other layers), never the N x C x P Jacobian
  (:mod:`fim_linops.laplace.structured`);
* lowrank: Woodbury, (J U) D (J U)^T + Theta / delta, J U by forward mode;
* dense, block_diag, mixed: per batch the Jacobian rows from the layer rules (batch x C x P),
  one exact solve with P.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from fim_linops.data import batch_size as n_examples
from fim_linops.data import call_model
from fim_linops.engine import Engine
from fim_linops.engine.dropout import warn_active_dropout
from fim_linops.engine.gram import gram_per_example, side
from fim_linops.engine.outputs import jacobian_rows, outputs_engine
from fim_linops.laplace import structured
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Bernoulli, Categorical, Likelihood
from fim_linops.memory_guard import check_bytes
from fim_linops.ntk import _jacobian_op, split_inputs
from fim_linops.operators import LowRank
from fim_linops.operators.jacobian import Outputs
from fim_linops.operators.ntk import gram_of
from fim_linops.options import BuildOptions
from fim_linops.sharding.gather import on_gathered_model
from fim_linops.state import preserved_state


class GLMPredictive:
    """The predictive methods of :class:`fim_linops.laplace.Laplace`, which provides the
    attributes declared here (the model at the MAP, the layout, the likelihood, the GGN, the
    options of the build) and the posterior precision."""

    model: nn.Module
    layout: ParamLayout
    likelihood: Likelihood
    options: BuildOptions
    ggn: LinearOperator
    dtype: torch.dtype
    device: torch.device
    sigma: Tensor | None
    _prior: Tensor
    _n_outputs: int

    @property
    def posterior_precision(self) -> LinearOperator:
        raise NotImplementedError

    def _scale(self, sigma: Tensor | None) -> Tensor:
        raise NotImplementedError

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
                self.options.max_bytes,
                "use joint=False (per-example (N, C, C) covariances) or fewer inputs",
            )
        if isinstance(self.ggn, LowRank):
            return self._predictive_lowrank(x, joint)
        prec = self.posterior_precision
        covs_l = structured.layer_covariances(prec, self.layout)
        if covs_l is not None:
            return self._predictive_structured(x, joint, covs_l)
        batches = split_inputs(x, self.options.batch_size)
        check_bytes(
            "the Jacobian of one batch",
            (n_examples(batches[0]) * self._n_outputs, self.layout.numel),
            self.dtype,
            self.options.max_bytes,
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
        batches = split_inputs(x, self.options.batch_size)
        mean = torch.cat([self._forward(xb) for xb in batches])
        parts: list = []
        with preserved_state(self.model):
            engine = self._engine(batches)
            for res in engine.run([(xb, None) for xb in batches]):
                feats = structured.batch_features(res, covs)
                parts.append((res.n, res.k, feats) if joint else structured.per_example(feats))
                del res  # release this batch before the engine makes the next
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
        batches = split_inputs(x, self.options.batch_size)
        jac = _jacobian_op(self.model, self.layout, x, Outputs(), self.options)
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
                del res  # release this batch before the engine makes the next
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
