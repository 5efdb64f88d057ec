r"""The mean Fisher a :class:`~fim_linops.laplace.Laplace` posterior scales to its GGN, replicated
(``fl.fisher``: every rank holds the whole operator) or sharded (``sharded=True``:
``fl.sharding.fisher_sharded``, each rank keeps its share of the statistics).

Sharded, P = s G + delta I stays a :class:`~fim_linops.sharding.ShardedFisher` (the prior is its
damping), so its solves, roots and log-determinant are collectives: every rank calls the
posterior's methods in the same order, as for a forward of the FSDP model. The evidence needs G's
eigenvalues (P,), all-gathered once and cached (detached: log det P = sum log(s lambda + delta)
stays differentiable in s and delta), the same size as the MAP vector every rank keeps.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from fim_linops.layout import ParamLayout
from fim_linops.memory_guard import check_bytes
from fim_linops.operators.base import FisherOperator
from fim_linops.options import BuildOptions

#: the structures fisher_sharded builds
SHARDED = ("diag", "kfac", "ekfac")
#: fl.fisher arguments that fisher_sharded also takes (the others are for fl.fisher only)
SHARDED_KWARGS = (
    "fisher_type",
    "mc_samples",
    "device",
    "dtype",
    "progress",
    "generator",
    "process_group",
    "kfac_approx",
)


def check_structure_memory(
    structure: Any, layout: ParamLayout, dtype: torch.dtype, max_bytes: int | None
) -> None:
    """Raise before fitting when a dense or block-diagonal posterior exceeds max_bytes."""
    p = layout.numel
    fix = "use structure='kfac', 'ekfac', 'diag' or 'lowrank' (rank=...), or params=..."
    if structure == "dense":
        check_bytes("the dense posterior precision", (p, p), dtype, max_bytes, fix)
    elif structure == "block_diag":
        need = sum(b.numel**2 for b in layout.blocks)
        check_bytes("the block-diagonal posterior precision", (need,), dtype, max_bytes, fix)


def mean_fisher(
    model: nn.Module,
    data: Any,
    structure: Any,
    options: BuildOptions,
    sharded: bool,
    rank: int | None,
) -> FisherOperator:
    """The mean Fisher over the data of all ranks (exact unless ``options.fisher_type`` says
    otherwise): ``fl.fisher``'s build, or with ``sharded`` ``fisher_sharded``'s."""
    from fim_linops.fisher import build_fisher

    if not sharded:
        budget = sys.maxsize if options.max_bytes is None else options.max_bytes
        return build_fisher(model, data, structure, options.but(max_bytes=budget))
    from fim_linops.sharding.build import fisher_sharded

    if structure not in SHARDED:
        raise ValueError(
            f"Laplace(sharded=True) builds its GGN with fl.sharding.fisher_sharded, which takes "
            f"structure='diag', 'kfac' or 'ekfac', got {structure!r}; use one of those, or "
            "sharded=False (every rank then holds the whole GGN)"
        )
    if rank is not None or options.strict:
        what = "rank" if rank is not None else "strict"
        raise ValueError(
            f"Laplace(sharded=True) passes only {', '.join(SHARDED_KWARGS)} on to "
            f"fisher_sharded, got {what}"
        )
    o = options
    return fisher_sharded(
        model, data, o.likelihood, structure=structure, fisher_type=o.fisher_type,
        mc_samples=o.mc_samples, params=o.params, device=o.device, dtype=o.dtype,
        progress=o.progress, generator=o.generator, process_group=o.process_group,
        kfac_approx=o.kfac_approx,
    )  # fmt: skip
