r"""The engine of a model's outputs: per-example Jacobian rows through the layer rules.

Shapes: N examples, C selected outputs per example, P trainable parameters in the public vector
order; rows are example-major (index n*C + c). The back-propagated columns are the identity
(``sel``, an :class:`~fim_linops.operators.jacobian.Outputs`), so the engine's per-example
gradients are the rows of the Jacobian. Used by the function-space operators (the Jacobian's and
the NTK's dense forms), ``fl.ntk``, the GP kernel and the Laplace predictives.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fim_linops.data import batch_size, first_examples
from fim_linops.engine.engine import Engine, FisherType
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood
from fim_linops.state import preserved_state


def outputs_engine(
    model: nn.Module, layout: ParamLayout, sel: Likelihood, *inputs: list[Any]
) -> Engine:
    r"""The engine of the outputs' Jacobians (identity columns ``sel``) for every batch of
    ``inputs`` (lists of batches), with the checks of the Fisher path's first batch run before
    any batch (:func:`fim_linops.engine.checks.probe_checks`) on the largest first batch: a layer
    whose rule would be wrong on these inputs (a call shared by all examples, a time-major
    sequence, a direct use of its weight, ...) goes through torch.func, as in ``fl.fisher``.
    Every batch an engine runs must be among ``inputs``: the checks are not repeated per batch."""
    firsts = [b[0] for b in inputs if b]
    probe = max(firsts, key=batch_size) if firsts else None
    return Engine(
        model,
        layout,
        sel,
        FisherType.EXACT,
        probe=None if probe is None else first_examples(probe),
    )


def jacobian_rows(engine: Engine, batches: list[Any]) -> Iterator[Tensor]:
    """Per batch (n examples) its dense Jacobian (n*C, P), row n*C + c, through the engine's
    per-example gradients (layer rules, torch.func for the rest)."""
    for res in engine.run([(x, None) for x in batches]):
        g = torch.cat(res.all_block_grads(0, res.n), dim=-1)  # (C, n, P)
        del res  # release this batch before the engine makes the next
        yield g.transpose(0, 1).reshape(-1, engine.layout.numel)


def jacobian_matrix(
    model: nn.Module, layout: ParamLayout, batches: list[Any], sel: Likelihood
) -> Tensor:
    """The dense Jacobian (N*C, P) through the engine (per-example gradients by layer rules)."""
    with preserved_state(model):
        engine = outputs_engine(model, layout, sel, batches)
        return torch.cat(list(jacobian_rows(engine, batches)))
