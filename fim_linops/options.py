r"""``BuildOptions``: the arguments of a build, checked once and handed down as one frozen object.

Every entry point that runs the engine (``fl.fisher``, the one-pass mix, ``fl.ntk`` and
``fl.jacobian``, ``fl.laplace.Laplace``, ``fl.influence``, ``fl.sharding.fisher_sharded``; FishLeg
for its Fisher products) turns its public keyword arguments into one :class:`BuildOptions` with
:meth:`BuildOptions.of` (or :meth:`BuildOptions.of_arguments`) and hands that object down; the
functions below an entry point take ``(model, data, ..., options)``, never the arguments one by
one. The checks that need no model run in :meth:`BuildOptions.of`; those that need the model's
parameters (``params``, mixed dtypes, the generator's device) in :meth:`BuildOptions.layout_of`.
A change is a new object (:meth:`BuildOptions.but`), checked again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fim_linops.engine import FisherType
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood, get_likelihood
from fim_linops.memory_guard import DEFAULT_MAX_BYTES

#: default limit on the bytes of one dense (P x P) or block allocation before asking for consent
MAX_DENSE_BYTES = DEFAULT_MAX_BYTES

#: default number of examples per forward/backward pass of the function-space operators
DEFAULT_BATCH_SIZE = 256

KFAC_APPROX = ("expand", "reduce")


def _default_likelihood() -> Likelihood:
    return get_likelihood("categorical")


@dataclass(frozen=True)
class BuildOptions:
    r"""How a build runs (what it builds, the structure, is passed beside it).

    Attributes:
        likelihood: the parsed likelihood (``fl.Likelihood``).
        fisher_type: exact, mc (``mc_samples`` sampled labels drawn with ``generator``) or
            empirical.
        mc_samples: samples per example for ``fisher_type="mc"`` (a positive int).
        params: the parameters as the user selected them (None: all trainable ones); resolved
            against a model by :meth:`layout_of`.
        rank: k of "lowrank", r of "kron_sum" (checked against P by the builder).
        device: where to compute (None: the model's device).
        dtype: in which floating precision to compute (None: the model's).
        progress: a tqdm bar over the batches.
        generator: a ``torch.Generator`` for the sampled columns (None: the global RNG).
        max_bytes: memory budget of dense/block storage, of the engine's chunked backward passes
            and of function-space allocations (None: no limit).
        process_group: a torch.distributed group (None: the world group when initialised).
        kfac_approx: "expand" or "reduce" (Eschenhagen et al. 2023) for layers applied at
            several positions.
        strict: "kfac"/"ekfac"/"kron_sum": raise for a layer without Kronecker factors instead
            of giving it an exact block.
        batch_size: examples per forward pass of the function-space operators (Jacobian, NTK,
            the Laplace predictive); None: all at once.
    """

    likelihood: Likelihood = field(default_factory=_default_likelihood)
    fisher_type: FisherType = FisherType.EXACT
    mc_samples: int = 1
    params: Any = None
    rank: int | None = None
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    progress: bool = False
    generator: torch.Generator | None = None
    max_bytes: int | None = MAX_DENSE_BYTES
    process_group: Any = None
    kfac_approx: str = "expand"
    strict: bool = False
    batch_size: int | None = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        """The checks that need no model (the parsing of names is :meth:`of`'s)."""
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {self.mc_samples!r}")
        dtype = self.dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        gen = self.generator
        if gen is not None and not isinstance(gen, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator (or None), got {type(gen).__name__} "
                f"{gen!r}; for a seed pass torch.Generator().manual_seed(seed)"
            )
        if self.kfac_approx not in KFAC_APPROX:
            raise ValueError(f"unknown kfac_approx {self.kfac_approx!r}; use 'expand' or 'reduce'")

    @classmethod
    def of(
        cls,
        likelihood: str | Likelihood = "categorical",
        fisher_type: str | FisherType = "exact",
        device: torch.device | str | None = None,
        **fields: Any,
    ) -> BuildOptions:
        """The options of an entry point's public keyword arguments: the names of a likelihood, a
        Fisher type and a device parsed, the other ``fields`` as they are; every check that needs
        no model runs here (a bad value raises the error the entry point documents)."""
        lik = get_likelihood(likelihood)
        ftype = FisherType.parse(fisher_type)
        dev = torch.device(device) if device is not None else None
        return cls(likelihood=lik, fisher_type=ftype, device=dev, **fields)

    @classmethod
    def of_arguments(cls, arguments: Mapping[str, Any], **overrides: Any) -> BuildOptions:
        """:meth:`of` an entry point's public arguments by name: ``locals()`` taken first thing in
        its body, so that the explicit keyword signature is not written out a second time. Every
        argument named like a field is taken (``likelihood``, ``fisher_type`` and ``device``
        parsed), the others ignored; ``overrides`` (fields) replace or add values."""
        given = {k: arguments[k] for k in _FIELDS if k in arguments}
        given.update(overrides)
        return cls.of(**given)

    def but(self, **changes: Any) -> BuildOptions:
        """A copy with ``changes`` (field names), checked again."""
        return dataclasses.replace(self, **changes)

    def layout_of(self, model: nn.Module) -> ParamLayout:
        """The layout of ``params`` in ``model``, after the checks that need the model: the
        selection itself, one dtype across it, and the generator on the computation's device."""
        layout = ParamLayout.from_model(model, self.params)
        dtypes = {e.param.dtype for e in layout.entries}
        if len(dtypes) > 1:
            raise ValueError(
                "the selected parameters mix dtypes ("
                + ", ".join(sorted(str(d) for d in dtypes))
                + "); cast the model to one dtype, or pass dtype= (the model is then copied)"
            )
        if self.generator is not None:
            dev = self.device if self.device is not None else layout.entries[0].param.device
            if self.generator.device.type != dev.type:
                raise ValueError(
                    f"generator is on {self.generator.device} but the Fisher is computed on "
                    f"{dev}; pass torch.Generator(device='{dev}').manual_seed(seed)"
                )
        return layout


#: the names of :class:`BuildOptions`' fields (what :meth:`BuildOptions.of_arguments` takes)
_FIELDS = tuple(f.name for f in dataclasses.fields(BuildOptions))
