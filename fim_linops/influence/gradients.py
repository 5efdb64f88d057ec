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
from fim_linops.data import _is_mapping_batch, _looks_like_one_batch
from fim_linops.engine import FisherType
from fim_linops.frame import run_build
from fim_linops.layout import ParamLayout
from fim_linops.options import BuildOptions

R = TypeVar("R")

#: consume(blocks) with blocks[b] (n_chunk, p_b) the chunk's gradients of layout block b, in the
#: public vector order (concatenated along the last dim they are the rows of the (n_chunk, P) matrix)
Consumer = Callable[[list[Tensor]], R]


def stream_gradients(
    model: nn.Module,
    data: Any,
    consume: Consumer[R],
    options: BuildOptions,
    progress_label: str = "influence",
) -> tuple[list[R], int]:
    """``consume`` applied to every chunk of per-example gradients of ``data`` in order; returns
    the list of its results and the number P of parameters of the layout. Of ``options`` this
    pass reads the likelihood, ``params``, ``device``, ``dtype``, ``kfac_approx`` and
    ``max_bytes`` (its Fisher type is "empirical", one column per example); ``progress``: a tqdm
    bar over the batches labelled ``progress_label``.

    The model is left exactly as found (the same frame as :func:`fim_linops.fisher`); a restart of
    the pass (layers found to need torch.func on the first batch) starts the list afresh."""

    progress = options.progress

    def prepare(
        work: nn.Module, layout: ParamLayout, dt: torch.dtype
    ) -> Callable[[BuildContext], tuple[list[R], int]]:
        def build(ctx: BuildContext) -> tuple[list[R], int]:
            p = ctx.engine.layout.numel
            out: list[R] = []
            results = ctx.results()
            bar = _bar(data, progress_label) if progress else None
            try:
                for res in results:
                    for lo, hi in res.chunks(p, func=True):
                        # K = 1; detached: the torch.func blocks must not keep a graph alive
                        blocks = [g[0].detach() for g in res.all_block_grads(lo, hi)]
                        out.append(consume(blocks))
                    if bar is not None:
                        bar.update(1)
                    del res  # release this batch before the engine makes the next
            finally:
                results.close()
                if bar is not None:
                    bar.close()
            return out, p

        return build

    # the engine's own bar says "fisher": this pass has its own bar
    empirical = options.but(
        fisher_type=FisherType.EMPIRICAL,
        mc_samples=1,
        progress=False,
        generator=None,
        process_group=None,
        rank=None,
    )
    return run_build(model, data, empirical, prepare)


def _bar(data: Any, label: str) -> Any:
    """A tqdm bar over the batches of ``data`` (its total when the data has a length)."""
    from tqdm.auto import tqdm

    if _looks_like_one_batch(data) or _is_mapping_batch(data):
        total: int | None = 1
    else:
        total = len(data) if hasattr(data, "__len__") else None
    return tqdm(total=total, desc=label, unit="batch")


def gradient_matrix(model: nn.Module, data: Any, options: BuildOptions) -> Tensor:
    """The per-example gradients (N, P) of a small set of examples (the queries)."""
    parts, p = stream_gradients(
        model, data, lambda blocks: torch.cat(blocks, dim=-1), options.but(progress=False)
    )
    if not parts:
        raise ValueError("the query data holds no examples; pass at least one (x, y) batch")
    return torch.cat(parts)
