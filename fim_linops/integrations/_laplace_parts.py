r"""Conversions between laplace-torch's conventions and fim_linops' for the backends of
:mod:`fim_linops.integrations.laplace_torch`: mapping inputs, subnetwork indices, per-call
options and the ``Kron`` layout. Imported by that module after its laplace-torch check.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from laplace.utils import Kron
from torch import Tensor, nn

from fim_linops.operators import KFAC


class WholeMapping(nn.Module):
    r"""``model(x)`` with the whole mapping ``x`` (laplace-torch's convention for dict inputs,
    e.g. a Hugging Face batch with ``input_ids``, ``attention_mask`` and ``labels``), under
    fim_linops' convention, which calls a model with a mapping input as ``model(**x)``.

    The parameters are ``model``'s own (named ``model.<name>``, in the same order), so a
    Fisher of this module is the Fisher of ``model``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **x: Any) -> Any:
        return self.model(x)


def as_called(model: nn.Module, x: Any) -> nn.Module:
    """The module that fim_linops calls on ``x`` so that ``model`` sees ``model(x)``."""
    return WholeMapping(model) if isinstance(x, Mapping) else model


@dataclass(frozen=True)
class Subnet:
    r"""A subnetwork: flat indices into ``parameters_to_vector(params)`` (laplace-torch's
    ``subnetwork_indices``) as the parameters that hold them (``params``, in model order) and
    the indices into the flat vector of those parameters alone (``local``, (S,))."""

    params: list[nn.Parameter]
    local: Tensor

    @classmethod
    def of(cls, params: Sequence[nn.Parameter], indices: Tensor) -> Subnet:
        idx = torch.as_tensor(indices).reshape(-1).long()
        sizes = torch.tensor([p.numel() for p in params])
        ends = sizes.cumsum(0)
        p = int(ends[-1])
        if idx.numel() == 0 or bool((idx < 0).any() | (idx >= p).any()):
            raise ValueError(
                f"subnetwork_indices must be non-empty indices into the {p} parameters "
                "(parameters_to_vector order)"
            )
        owner = torch.bucketize(idx.cpu(), ends, right=True)  # which parameter holds each index
        used = torch.zeros(len(params), dtype=torch.bool)
        used[owner] = True
        # start of each parameter in the full vector, and in the vector of the used ones
        start = ends - sizes
        local_start = (sizes * used).cumsum(0) - sizes * used
        local = idx.cpu() - start[owner] + local_start[owner]
        kept = [q for q, u in zip(params, used.tolist(), strict=True) if u]
        return cls(kept, local.to(params[0].device))


#: the per-call options of the backends' ``full``, ``kron`` and ``diag`` (laplace-torch passes
#: them per call, and KronLaplace/DiagLaplace pass ``asdl_fisher_kwargs`` the same way)
CALL_OPTIONS = ("N", "mc_samples", "n_mc_samples", "kfac_approx", "seed")


@dataclass(frozen=True)
class CallOptions:
    """One call's options: Monte Carlo samples (used by ``stochastic=True``), the KFAC
    convention for layers applied at several positions (used by ``kron``), the generator of
    the sampled labels (from ``seed``)."""

    mc_samples: int
    kfac_approx: str
    generator: torch.Generator | None

    @classmethod
    def parse(
        cls, kwargs: Mapping[str, Any], mc_samples: int, kfac_approx: str, device: torch.device
    ) -> CallOptions:
        """The options of one call over the backend's defaults. ``mc_samples`` (curvlinops'
        name) or ``n_mc_samples`` (ASDL's), ``kfac_approx`` ("expand" or "reduce"), ``seed``
        (ASDL's: an int that seeds the draws of this call), ``N`` (read by ``kron``)."""
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS))
        if unknown:
            raise TypeError(
                f"unexpected keyword arguments {unknown} for a fim_linops backend; its per-call "
                "options (also through Laplace(..., asdl_fisher_kwargs={...})) are mc_samples "
                "(or n_mc_samples), kfac_approx and seed; pass backend options as "
                "Laplace(..., backend_kwargs={...}) (stochastic, num_samples, low_rank, "
                "kfac_approx)"
            )
        if "mc_samples" in kwargs and "n_mc_samples" in kwargs:
            raise TypeError("pass mc_samples or n_mc_samples, not both")
        mc = kwargs.get("mc_samples", kwargs.get("n_mc_samples", mc_samples))
        if isinstance(mc, bool) or not isinstance(mc, int) or mc < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc!r}")
        seed = kwargs.get("seed")
        generator = None
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int, got {type(seed).__name__}")
            generator = torch.Generator(device=device).manual_seed(seed)
        return cls(mc, kwargs.get("kfac_approx", kfac_approx), generator)


def kfac_to_kron(op: KFAC, sum_scale: float, mean_scale: float) -> Kron:
    r"""fim_linops ``KFAC`` (blocks L kron R over [W | b]) -> laplace-torch ``Kron``.

    Per block, the weight gets [sum_scale L, mean_scale R_w] (R_w: R without the bias row and
    column) and the bias [sum_scale R_bb L] (R_bb: the bias-bias entry of R, 1 for Linear): the
    bias block is a plain sum over the examples, which laplace-torch never rescales.
    Grouped convolutions (one factor pair per group) have no ``Kron`` form.
    """
    kfacs: list[list[Tensor]] = []
    for spec, left, right in op.pairs():
        if spec.groups != 1:
            raise ValueError(
                f"layer '{spec.name}' is a grouped convolution (groups={spec.groups}): "
                "laplace-torch's Kron has one factor pair per parameter; use "
                "hessian_structure='diag' or 'full'"
            )
        left0, right0 = left[0], right[0]  # (rows, rows), (cols, cols)
        if spec.has_weight:
            w = spec.w_cols
            kfacs.append([left0 * sum_scale, right0[:w, :w] * mean_scale])
        if spec.has_bias:
            kfacs.append([left0 * (sum_scale * right0[-1, -1])])
    # lists, not tuples: KronLaplace rescales the factors in place (its annotation says tuples)
    return Kron(kfacs)  # type: ignore[arg-type]


class LaplaceBatches:
    r"""A laplace-torch loader as fim_linops (x, y) batches on ``device``, re-iterable (a
    structure may pass over the data more than once): a batch that is a mapping (a Hugging
    Face batch) is (the whole mapping, ``batch[dict_key_y]``), as laplace-torch reads it."""

    def __init__(self, loader: Any, dict_key_y: str, device: torch.device) -> None:
        self.loader = loader
        self.dict_key_y = dict_key_y
        self.device = device

    def pair(self, batch: Any) -> tuple[Any, Tensor]:
        x, y = (batch, batch[self.dict_key_y]) if isinstance(batch, Mapping) else batch
        return move(x, self.device), y.to(self.device)

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for batch in self.loader:
            yield self.pair(batch)


def move(x: Any, device: torch.device) -> Any:
    """The tensors of an input (a tensor or a mapping of them) on ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: move(v, device) for k, v in x.items()}
    return x
