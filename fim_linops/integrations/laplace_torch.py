r"""laplace-torch backends running on the fim_linops engine.

``FimLinopsGGN`` (generalised Gauss-Newton = exact Fisher, or its Monte Carlo estimate with
``stochastic=True``) and ``FimLinopsEF`` (empirical Fisher) are ``laplace.curvature`` backends:

    la = laplace.Laplace(model, "classification", hessian_structure="kron", backend=FimLinopsGGN)

Every curvature comes from :func:`fim_linops.fisher` (structures ``diag``, ``kfac``, ``dense``,
``lowrank``), every Jacobian from :func:`fim_linops.jacobian`, every per-example gradient from the
engine's layer rules; this module only converts normalisations and layouts.

Conventions of laplace-torch, for a batch of M examples out of N (``lossfunc`` is its
``CrossEntropyLoss(reduction="sum")`` or ``MSELoss(reduction="sum")``, ``factor`` 1 or 1/2):

* GGN: sum_n J_n^T H_n J_n with H_n the Hessian of -log p(y | f) (categorical, or Gaussian with
  unit variance), i.e. M F_batch with F_batch = 1/M sum_n ... fim_linops' mean normalisation;
* EF: factor sum_n grad(lossfunc_n) grad(lossfunc_n)^T = M F_emp / factor, since
  grad(lossfunc) = grad(-log p) / factor (for regression laplace-torch's EF is twice the
  Gaussian empirical Fisher; we follow it so that the backends agree);
* loss: factor * lossfunc(f, y) summed over the batch (``gradients`` returns it without factor);
* ``kron(x, y, N)``: a ``laplace.utils.Kron`` with, per parameter in ``model.parameters()`` order,
  [F0, F1] for a weight (F0 kron F1 over the row-major weight) and [F0 R_bb] for a bias, where
  F0 = M * scale * (left factor) carries the sum over the batch and F1 = (M / N) * (right factor)
  the mean over the data set, so that laplace-torch's sum over batches of each factor gives
  N scale (L kron R) with L, R the data-set factors (the convention of its BackPACK and curvlinops
  backends). The bias block is the bias-bias entry of the joint [W | b] factor (1 for Linear);
  the weight-bias cross terms are dropped, as laplace-torch's ``Kron`` has no place for them.
* ``eig_lowrank(loader)``: eigenvectors (P, k), eigenvalues (k,) of N scale F over the loader and
  the loss, keeping only the eigenvalues above ``1000 eps lambda_max`` (LowRankLaplace takes their
  logarithm and their inverse).
* inputs: a mapping ``x`` (a Hugging Face batch) is passed whole, ``model(x)``, and a mapping
  batch's labels are ``batch[dict_key_y]`` (fim_linops' own API calls ``model(**x)``: the
  backends wrap the model, :class:`~fim_linops.integrations._laplace_parts.WholeMapping`);
* ``subnetwork_indices`` (SubnetLaplace sets them on the backend after construction): ``full``,
  ``diag``, ``jacobians`` and ``gradients`` keep those flat entries (in the order given); ``full``
  sums the outer products of the engine's back-propagated columns restricted to them (S x S,
  never the P x P curvature);
* targets: class indices (M,) or probabilities (M, C) for classification (the GGN does not depend
  on them; the EF uses the soft cross-entropy's gradient softmax(f) - q).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

import fim_linops as fl
from fim_linops.data import first_examples
from fim_linops.engine import Engine, FisherType
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood
from fim_linops.operators.base import FisherOperator
from fim_linops.state import preserved_state

try:
    from laplace.baselaplace import LowRankLaplace as _LowRankLaplace
    from laplace.baselaplace import ParametricLaplace
    from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
    from laplace.utils import Kron
except ImportError as err:  # pragma: no cover - exercised only without laplace-torch
    raise ImportError(
        "fim_linops.integrations.laplace_torch needs laplace-torch (and torchvision): "
        "pip install 'fim_linops[laplace]' or pip install laplace-torch"
    ) from err

from fim_linops.integrations._laplace_parts import (
    CallOptions,
    LaplaceBatches,
    Subnet,
    as_called,
    kfac_to_kron,
)

__all__ = [
    "FimLinopsEF",
    "FimLinopsGGN",
    "FimLinopsInterface",
    "LowRankLaplace",
    "kfac_to_kron",
]

#: eigenvalues at or below this multiple of eps * lambda_max are dropped by ``eig_lowrank``
LOWRANK_CUTOFF = 1000.0


class FimLinopsInterface(CurvatureInterface):
    r"""Common part of the fim_linops backends (see the module docstring for the conventions).

    Args:
        model, likelihood, last_layer, dict_key_x, dict_key_y: as every laplace-torch backend;
            with ``last_layer=True`` (``model`` a laplace ``FeatureExtractor``) the curvature is
            that of ``model.last_layer`` on the extracted features. A mapping input ``x`` is
            passed whole, ``model(x)`` (laplace-torch's convention), and the labels of a mapping
            batch are ``batch[dict_key_y]``.
        subnetwork_indices: None, or flat indices into ``parameters_to_vector`` of the trainable
            parameters (SubnetLaplace sets the attribute after construction): ``full``, ``diag``,
            ``jacobians`` and ``gradients`` are then restricted to those entries.
        low_rank: k, the number of eigenpairs ``eig_lowrank`` keeps (LowRankLaplace; pass it as
            ``backend_kwargs={"low_rank": k}``).
        kfac_approx: "expand" or "reduce", for layers applied at several positions (a call's
            ``kfac_approx=`` overrides it).

    ``full``, ``kron`` and ``diag`` take laplace-torch's per-call options (also through
    ``Laplace(..., asdl_fisher_kwargs={...})``): ``mc_samples`` (or ASDL's ``n_mc_samples``: the
    labels sampled per example with ``stochastic=True``), ``kfac_approx``, ``seed`` (draws of
    this call) and ``N``.
    """

    _fisher_type: FisherType = FisherType.EXACT

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        low_rank: int = 10,
        kfac_approx: str = "expand",
    ) -> None:
        if isinstance(low_rank, bool) or not isinstance(low_rank, int) or low_rank < 1:
            raise ValueError(f"low_rank must be a positive integer, got {low_rank!r}")
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self.low_rank = low_rank
        self.kfac_approx = kfac_approx
        self.mc_samples = 1

    # -- conventions ------------------------------------------------------------------------------
    @property
    def fl_likelihood(self) -> Likelihood:
        """The fim_linops likelihood of laplace-torch's: Categorical, or Gaussian(sigma=1)."""
        return fl.Categorical() if self.likelihood == "classification" else fl.Gaussian(1.0)

    @property
    def scale(self) -> float:
        """laplace-torch's curvature of M examples over M times fim_linops' mean Fisher."""
        return 1.0 / self.factor if self._fisher_type is FisherType.EMPIRICAL else 1.0

    def _inputs(self, x: Any) -> tuple[nn.Module, Any, Tensor]:
        """(module, its inputs, model output f (M, C)): the whole model on x (called as
        ``model(x)``, a mapping too), or with ``last_layer`` the last layer on the features."""
        with torch.no_grad():
            if self.last_layer:  # model is a laplace FeatureExtractor
                f, phi = self.model.forward_with_features(x)  # type: ignore[operator]
                last: nn.Module = self.model.last_layer  # type: ignore[assignment]
                return last, phi.detach(), f.detach()
            return as_called(self.model, x), x, self.model(x).detach()

    def _subnet(self) -> Subnet | None:
        """The subnetwork that ``subnetwork_indices`` (set by SubnetLaplace) selects, if any."""
        if self.subnetwork_indices is None:
            return None
        if self.last_layer:
            raise ValueError("subnetwork_indices and last_layer=True do not go together")
        return Subnet.of(self.params, self.subnetwork_indices)

    def _options(self, kwargs: dict[str, Any]) -> CallOptions:
        return CallOptions.parse(kwargs, self.mc_samples, self.kfac_approx, self.params[0].device)

    def _fisher(
        self, module: nn.Module, data: Any, structure: str, opts: CallOptions, **kwargs: Any
    ) -> FisherOperator:
        return fl.fisher(
            module,
            data,
            likelihood=self.fl_likelihood,
            structure=structure,
            fisher_type=self._fisher_type,
            mc_samples=opts.mc_samples,
            kfac_approx=opts.kfac_approx,
            generator=opts.generator,
            **kwargs,
        )

    # -- curvature --------------------------------------------------------------------------------
    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """(loss, diagonal (P,)) of the batch's curvature, M scale diag(F_batch) (restricted to
        the subnetwork, if any)."""
        opts = self._options(kwargs)
        module, inputs, f = self._inputs(x)
        sub = self._subnet()
        params = None if sub is None else sub.params
        op = self._fisher(module, (inputs, y), "diag", opts, params=params)
        d = op.diagonal() if sub is None else op.diagonal()[sub.local]
        return self.factor * self.lossfunc(f, y), d * (len(y) * self.scale)

    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """(loss, dense curvature (P, P)) of the batch, M scale F_batch; with a subnetwork
        (S, S), from the per-example back-propagated gradients of its entries alone."""
        opts = self._options(kwargs)
        module, inputs, f = self._inputs(x)
        loss = self.factor * self.lossfunc(f, y)
        sub = self._subnet()
        if sub is not None:
            return loss, self._subnet_full(module, inputs, y, sub, opts) * self.scale
        op = self._fisher(module, (inputs, y), "dense", opts)
        return loss, op.to_dense() * (len(y) * self.scale)

    def _subnet_full(
        self, module: nn.Module, inputs: Any, y: Tensor, sub: Subnet, opts: CallOptions
    ) -> Tensor:
        r"""sum_{k, n} g_kn g_kn^T over the subnetwork's S entries, g_kn the engine's
        back-propagated columns (K per example: Hessian-root columns, sampled or empirical
        gradients) through the parameters that hold the entries: (S, S), chunked over examples."""
        layout = ParamLayout.from_model(module, sub.params)
        s = sub.local.numel()
        out = torch.zeros(s, s, dtype=self.params[0].dtype, device=self.params[0].device)
        with preserved_state(module):
            engine = Engine(
                module,
                layout,
                self.fl_likelihood,
                self._fisher_type,
                opts.mc_samples,
                opts.generator,
                probe=first_examples(inputs),
            )
            for res in engine.run([(inputs, y)]):
                for lo, hi in res.chunks(layout.numel):
                    g = torch.cat(res.all_block_grads(lo, hi), dim=-1)[..., sub.local]
                    # k: column, n: example, s/t: subnetwork entry
                    out += torch.einsum("kns,knt->st", g, g)
        return out

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """(loss, ``Kron``) of the batch in laplace-torch's layout and N scaling (module
        docstring); the factors are fim_linops' KFAC factors of the batch."""
        opts = self._options(kwargs)
        if self.subnetwork_indices is not None:
            raise ValueError(
                "a subnetwork (subnetwork_indices) has no Kronecker structure; SubnetLaplace "
                "takes hessian_structure='full' or 'diag'"
            )
        module, inputs, f = self._inputs(x)
        op = self._fisher(module, (inputs, y), "kfac", opts)
        kron = kfac_to_kron(op, sum_scale=len(y) * self.scale, mean_scale=len(y) / N)  # type: ignore[arg-type]
        return self.factor * self.lossfunc(f, y), kron

    def eig_lowrank(self, data_loader: Iterable) -> tuple[Tensor, Tensor, Tensor]:
        """(eigenvectors (P, k'), eigenvalues (k',), loss) of the curvature N scale F over the
        loader: the top k = ``low_rank`` eigenpairs of fim_linops' ``structure="lowrank"`` (exact
        SVD of the stacked per-example gradients when they fit, Lanczos on exact products
        otherwise), less those numerically zero (k' <= k)."""
        if self.subnetwork_indices is not None:
            raise ValueError("eig_lowrank (LowRankLaplace) does not take subnetwork_indices")
        device, dtype = self.params[0].device, self.params[0].dtype
        batches = LaplaceBatches(data_loader, self.dict_key_y, device)
        loss = torch.zeros((), device=device, dtype=dtype)
        n = 0
        features = []
        module: nn.Module = self.model
        for x, y in batches:
            module, inputs, f = self._inputs(x)
            loss = loss + self.lossfunc(f, y)
            n += len(y)
            if self.last_layer:
                features.append((inputs, y))
        p = sum(q.numel() for q in self.params)
        data: Any = features if self.last_layer else batches
        opts = self._options({})
        op = self._fisher(module, data, "lowrank", opts, rank=min(self.low_rank, p))
        evals = op.evals * (n * self.scale)  # type: ignore[attr-defined]
        keep = evals > evals.max() * LOWRANK_CUTOFF * torch.finfo(evals.dtype).eps
        return op.u[:, keep], evals[keep], self.factor * loss  # type: ignore[attr-defined]

    # -- first order ------------------------------------------------------------------------------
    def jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """(Js (M, C, P), f (M, C)): the Jacobian by the engine's layer rules (fl.jacobian),
        restricted to the subnetwork's entries, if any (M, C, S). ``enable_backprop=True``
        (gradients w.r.t. x through the predictive) falls back to laplace-torch's torch.func
        Jacobian, since the engine's are detached."""
        if enable_backprop:
            return super().jacobians(x, enable_backprop=True)
        sub = self._subnet()
        with torch.enable_grad():
            params = self.params if sub is None else sub.params
            jac = fl.jacobian(as_called(self.model, x), x, params=params)
            js = jac.to_dense().reshape(jac.n_examples, jac.n_outputs, -1)
        with torch.no_grad():
            f = self.model(x)
        return (js if sub is None else js[..., sub.local]), f.detach()

    def gradients(self, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        """(Gs (M, P), loss): per-example gradients of laplace-torch's ``lossfunc``, i.e. the
        engine's empirical columns d(-log p)/df back-propagated by the layer rules, over factor
        (restricted to the subnetwork's entries, if any); loss = lossfunc(f, y) summed (without
        factor, as laplace-torch's own)."""
        module, inputs, f = self._inputs(x)
        sub = self._subnet()
        params = self.params if self.last_layer else None if sub is None else sub.params
        layout = ParamLayout.from_model(module, params)
        parts = []
        with preserved_state(module):
            engine = Engine(
                module,
                layout,
                self.fl_likelihood,
                FisherType.EMPIRICAL,
                probe=first_examples(inputs),
            )
            for res in engine.run([(inputs, y)]):
                for lo, hi in res.chunks(layout.numel):
                    parts.append(torch.cat(res.all_block_grads(lo, hi), dim=-1)[0])  # (n, P)
        gs = torch.cat(parts) if sub is None else torch.cat(parts)[:, sub.local]
        return gs / self.factor, self.lossfunc(f, y).detach()


class FimLinopsGGN(FimLinopsInterface, GGNInterface):
    r"""Generalised Gauss-Newton backend (= the exact Fisher for these likelihoods), or with
    ``stochastic=True`` its Monte Carlo estimate with ``num_samples`` sampled labels."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        low_rank: int = 10,
        kfac_approx: str = "expand",
    ) -> None:
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            low_rank=low_rank,
            kfac_approx=kfac_approx,
        )
        self.stochastic = stochastic
        self.num_samples = num_samples
        self.mc_samples = num_samples
        self._fisher_type = FisherType.MC if stochastic else FisherType.EXACT


class FimLinopsEF(FimLinopsInterface, EFInterface):
    r"""Empirical Fisher backend: sum over the data of the outer products of the per-example
    gradients of laplace-torch's loss (its scaling, see the module docstring)."""

    _fisher_type = FisherType.EMPIRICAL


class LowRankLaplace(_LowRankLaplace):
    r"""laplace-torch's ``LowRankLaplace`` (posterior precision U diag(lambda) U^T + P_0 from the
    backend's ``eig_lowrank``) with ``FimLinopsGGN`` as its default backend.

    laplace-torch 0.3's constructor refuses to run unless a module named ``asdfghjkl`` (the old
    ASDL fork its default ``AsdfghjklHessian`` backend needs) is importable, which PyPI's
    ``asdfghjkl`` package does not provide (it installs ``asdl``); so
    ``laplace.Laplace(..., hessian_structure="lowrank")`` raises ImportError there whatever the
    backend. This class skips that check, which only concerns the default backend; everything
    else (fit, predictive, evidence, samples) is laplace-torch's own code. With the old asdfghjkl
    installed, ``laplace.Laplace(..., hessian_structure="lowrank", backend=FimLinopsGGN)`` is the
    same thing.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        backend: type[CurvatureInterface] | None = None,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend_kwargs: dict[str, Any] | None = None,
    ) -> None:
        ParametricLaplace.__init__(
            self,
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=FimLinopsGGN if backend is None else backend,
            backend_kwargs=backend_kwargs,
        )
