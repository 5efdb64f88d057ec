r"""Per-example gradients of the nll of each example's own labels, one chunk of a batch at a time.

For example n with output f_n and labels y_n, g_n = grad_theta nll(f_n, y_n) (summed over the
kept positions of a sequence output: that is what the likelihood's nll is). The engine runs with
``fisher_type="empirical"``: its one back-propagated column is V[0, n] = d nll(f_n, y_n) / d f_n,
so the per-example gradients of the layer rules (``LayerRule.grads`` from the captured a and g,
torch.func for the other parameters) are exactly the g_n. They are handed to ``consume`` one chunk
(n_chunk, p_b) per layout block at a time: no (N, P) matrix is ever formed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from fim_linops.builders import BuildContext
from fim_linops.engine import FisherType
from fim_linops.fisher import _run
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood

R = TypeVar("R")

#: consume(blocks) with blocks[b] (n_chunk, p_b) the chunk's gradients of layout block b, in the
#: public vector order (concatenated along the last dim they are the rows of the (n_chunk, P) matrix)
Consumer = Callable[[list[Tensor]], R]


def stream_gradients(
    model: nn.Module,
    data: Any,
    consume: Consumer[R],
    likelihood: str | Likelihood = "categorical",
    params: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    kfac_approx: str = "expand",
) -> tuple[list[R], int]:
    """``consume`` applied to every chunk of per-example gradients of ``data`` in order; returns
    the list of its results and the number of examples P of the parameter layout.

    The model is left exactly as found (the same frame as :func:`fim_linops.fisher`); a restart of
    the pass (layers found to need torch.func on the first batch) starts the list afresh."""

    def prepare(
        work: nn.Module, layout: ParamLayout, dt: torch.dtype, lik: Likelihood, ft: FisherType
    ) -> Callable[[BuildContext], tuple[list[R], int]]:
        def build(ctx: BuildContext) -> tuple[list[R], int]:
            p = ctx.engine.layout.numel
            out: list[R] = []
            results = ctx.results()
            try:
                for res in results:
                    for lo, hi in res.chunks(p):
                        blocks = [g[0] for g in res.all_block_grads(lo, hi)]  # K = 1
                        out.append(consume(blocks))
            finally:
                results.close()
            return out, p

        return build

    return _run(
        model,
        data,
        params,
        likelihood,
        FisherType.EMPIRICAL,
        1,
        device,
        dtype,
        progress,
        None,
        None,
        kfac_approx,
        None,
        prepare,
    )


def gradient_matrix(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    params: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    kfac_approx: str = "expand",
) -> Tensor:
    """The per-example gradients (N, P) of a small set of examples (the queries)."""
    parts, p = stream_gradients(
        model,
        data,
        lambda blocks: torch.cat(blocks, dim=-1),
        likelihood,
        params,
        device,
        dtype,
        kfac_approx=kfac_approx,
    )
    if not parts:
        raise ValueError("the query data holds no examples; pass at least one (x, y) batch")
    return torch.cat(parts)
