r"""Prior precisions and the posterior precision P = s G + P0 in each Fisher structure.

G = sum_n J_n^T H_n J_n is the GGN summed over the data (N times the mean exact Fisher), s a scale
(sigma_0^2 / sigma^2 when the Gaussian noise changes), P0 the prior precision:

* scalar (): delta I;
* per layer (L,): delta_l on the parameters of layout block l;
* diagonal (P,): one precision per parameter.

Structures keep their exact algebra: a scalar is the operator's damping; per-layer precisions make
KFAC/EKFAC a ``Mixed`` operator of per-layer blocks, each with its own damping; diagonal ones are
exact for dense, block_diag and diag. log det P is differentiable in P0 and s: through the
structure's fixed eigenvalues where P0 is constant on each eigenspace (scalar; per layer for
block-wise structures; any diagonal for ``Diag``), else through a Cholesky factorisation.
"""

from __future__ import annotations

import dataclasses
import enum

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.layout import ParamLayout
from fim_linops.operators import EKFAC, KFAC, BlockDiag, Dense, Diag, LowRank, Mixed


class PriorKind(enum.Enum):
    SCALAR = "scalar"
    LAYER = "layer"
    DIAG = "diag"


#: structures whose eigenvectors stay within a layout block
BLOCKWISE = (BlockDiag, KFAC, EKFAC, Diag)


def parse_prior(
    prior: float | Tensor, layout: ParamLayout, dtype: torch.dtype, device
) -> tuple[Tensor, PriorKind]:
    """The prior precision as a tensor and its kind; checks shape and positivity."""
    t = torch.as_tensor(prior, dtype=dtype, device=device)
    n_layers = len(layout.blocks)
    if t.numel() == 1:
        t, kind = t.reshape(()), PriorKind.SCALAR
    elif t.shape == (n_layers,):
        kind = PriorKind.LAYER
    elif t.shape == (layout.numel,):
        kind = PriorKind.DIAG
    else:
        raise ValueError(
            f"prior_precision of shape {tuple(t.shape)}: use a scalar, one value per layer "
            f"({n_layers},) or one per parameter ({layout.numel},)"
        )
    if not bool((t > 0).all()):
        raise ValueError("prior_precision must be positive")
    return t, kind


def expand(prior: Tensor, kind: PriorKind, layout: ParamLayout) -> Tensor:
    """The prior precision as a (P,) vector."""
    if kind is PriorKind.SCALAR:
        return prior.expand(layout.numel)
    if kind is PriorKind.DIAG:
        return prior
    sizes = torch.tensor(layout.block_sizes, device=prior.device)
    return torch.repeat_interleave(prior, sizes)


def _unsupported(ggn: LinearOperator, kind: PriorKind) -> ValueError:
    ok = "a scalar" if isinstance(ggn, LowRank) else "a scalar or one value per layer"
    return ValueError(
        f"structure='{getattr(ggn, 'structure', type(ggn).__name__)}' takes {ok} prior precision, "
        f"not a {kind.value} one; use structure='diag', 'block_diag' or 'dense' for per-parameter "
        "precisions"
    )


def _per_layer(op: KFAC | EKFAC, prior: Tensor) -> Mixed:
    """KFAC/EKFAC + per-layer damping: one single-block operator per layer in a Mixed."""
    ops, spans = [], []
    for i, spec in enumerate(op.specs):
        local = dataclasses.replace(spec, start=0, stop=spec.stop - spec.start)
        if isinstance(op, KFAC):
            sub: LinearOperator = KFAC(*op.factors[2 * i : 2 * i + 2], specs=(local,))
        else:
            sub = EKFAC(*op.tensors[3 * i : 3 * i + 3], specs=(local,))
        ops.append(sub.add_diagonal(prior[i]))
        spans.append(((spec.start, spec.stop),))
    return Mixed(*ops, spans=tuple(spans), structures=tuple(op.structure for _ in ops))


def precision(
    ggn: LinearOperator, scale: Tensor, prior: Tensor, kind: PriorKind, layout: ParamLayout
) -> LinearOperator:
    """s G + P0 as an operator of the same structure family (exact solves, roots, logdets)."""
    g = ggn * scale
    if kind is PriorKind.SCALAR:
        return g.add_diagonal(prior)
    from fim_linops.sharding.operator import ShardedFisher

    if isinstance(ggn, ShardedFisher):
        raise ValueError(
            f"a sharded Laplace (sharded=True) takes a scalar prior precision, not a {kind.value} "
            "one (its prior is the ShardedFisher's damping); use a scalar, or sharded=False"
        )
    vec = expand(prior, kind, layout)
    if isinstance(g, Diag):
        return Diag(g.diag + vec)
    if isinstance(g, Dense):
        return Dense(g.matrix + torch.diag(vec))
    if isinstance(g, BlockDiag):
        return BlockDiag(*[b + torch.diag(vec[lo:hi]) for b, lo, hi in g._spans()], names=g.names)
    if isinstance(g, (KFAC, EKFAC)) and kind is PriorKind.LAYER:
        return _per_layer(g, prior)
    raise _unsupported(ggn, kind)


def logdet(
    ggn: LinearOperator,
    evals: Tensor | None,
    scale: Tensor,
    prior: Tensor,
    kind: PriorKind,
    layout: ParamLayout,
) -> Tensor:
    """log det(s G + P0), differentiable in s and P0. ``evals``: G's eigenvalues (P,) in block
    order (from :func:`eigenvalues`), or None when the Cholesky route is needed."""
    vec = expand(prior, kind, layout)
    if evals is not None:
        return torch.log(scale * evals + vec).sum()
    if isinstance(ggn, Dense):
        return (
            2 * torch.linalg.cholesky(scale * ggn.matrix + torch.diag(vec)).diagonal().log().sum()
        )
    if isinstance(ggn, BlockDiag):
        return sum(
            2 * torch.linalg.cholesky(scale * b + torch.diag(vec[lo:hi])).diagonal().log().sum()
            for b, lo, hi in ggn._spans()
        )
    raise _unsupported(ggn, kind)


def eigenvalues(ggn: LinearOperator, kind: PriorKind) -> Tensor | None:
    """G's eigenvalues aligned with the parameters they may be shifted by: all of them for a scalar
    prior, block-aligned ones for per-layer priors of block-wise structures, the diagonal of Diag;
    None where log det needs a factorisation instead."""
    if not hasattr(ggn, "_eigenvalues"):
        raise ValueError(
            f"structure='{getattr(ggn, 'structure', '?')}' has no exact log-determinant; use "
            "'kfac', 'ekfac', 'diag', 'block_diag', 'dense' or 'lowrank'"
        )
    if isinstance(ggn, LowRank) and kind is not PriorKind.SCALAR:
        raise _unsupported(ggn, kind)
    if (
        kind is PriorKind.SCALAR
        or (kind is PriorKind.LAYER and isinstance(ggn, BLOCKWISE))
        or isinstance(ggn, Diag)
    ):
        if isinstance(ggn, (KFAC, EKFAC)) and kind is PriorKind.DIAG:
            raise _unsupported(ggn, kind)
        return ggn._eigenvalues().detach().clamp_min(0)
    if isinstance(ggn, (Dense, BlockDiag)):
        return None
    raise _unsupported(ggn, kind)
