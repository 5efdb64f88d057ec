r"""Influence scores: scores[i, j] = g_i^T (F + damping I)^-1 g_j.

g_i: gradient of query example i's nll of its own labels; g_j: the same for training example j;
F: the Fisher of the training data in the chosen structure (``fl.fisher(model, train, ...)``) or a
prebuilt operator. Positive: up-weighting training example j lowers query i's loss (to first
order, the loss change of query i when example j's weight in the mean training loss rises by
eps is -eps scores[i, j]; kronfluence's sign).

Cost: the queries' gradients Gq (n_query, P) are formed once and preconditioned once,
Q = (F + damping I)^-1 Gq^T (P, n_query), by the structure's own exact solve (per layer in the
Kronecker eigenbases for kfac/ekfac; CG for implicit). Then one pass over the training data: per
chunk of a batch, the per-example gradients (n_chunk, p_b) of each layer block (from the captured
a and g) are multiplied with that block's rows of Q. Memory: Q plus one chunk; never (n_train, P)
(the chunk size keeps (n_chunk, P) within the engine's memory budget). ``query_rank=r`` replaces Q
by its rank-r truncated SVD (:mod:`fim_linops.influence.queries`, error bound there).
``progress=True``: tqdm bars "fisher" (F's build) and "influence" (the training pass).

Distributed (torch.distributed initialised): F is all-reduced over the ranks as in
``fl.fisher``; every rank passes the same queries and its own shard of the training data and
gets the scores of its shard, (n_query, n_train_local) (indices local to the shard; gather with
``torch.distributed.all_gather`` if needed). FSDP2- and DDP-wrapped models are used through
their gathered plain module (:func:`fim_linops.sharding.gathered`, a collective: every rank calls
these functions). ``structure`` may be a :class:`~fim_linops.sharding.ShardedFisher`
(``fl.sharding.fisher_sharded``) in :func:`influence` and :func:`top_influences`: the queries'
solve is then one collective, and each rank keeps only its share of F.
"""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from fim_linops.influence.gradients import gradient_matrix, stream_gradients
from fim_linops.influence.precondition import Solve, check_damping, damped_solve
from fim_linops.influence.queries import Queries
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood
from fim_linops.options import MAX_DENSE_BYTES, BuildOptions
from fim_linops.sharding.gather import on_plain_model
from fim_linops.structures import Structure


def _operator(
    model: nn.Module,
    train: Any,
    structure: Any,
    damping: float,
    options: BuildOptions,
    cg_tol: float | None,
) -> tuple[Solve, int]:
    """The solve with (F + damping I) and P; F built from ``train`` unless given."""
    from fim_linops.fisher import build_fisher

    damping = check_damping(damping)
    p = ParamLayout.from_model(model, options.params).numel
    if isinstance(structure, LinearOperator | Tensor):
        op = structure
        if tuple(op.shape) != (p, p):
            raise ValueError(
                f"the prebuilt operator has shape {tuple(op.shape)} but the parameters selected "
                f"by params= have P={p}: build it with the same params= (and model)"
            )
    elif isinstance(structure, str | Structure | dict):
        op = build_fisher(model, train, structure, options)
    else:
        raise TypeError(
            f"structure must be a structure name ('ekfac', 'kfac', 'dense', ...), a per-layer mix "
            f"dict or a prebuilt LinearOperator, got {type(structure).__name__}"
        )
    return damped_solve(op, damping, cg_tol), p


def _preconditioned_queries(
    model: nn.Module, query: Any, solve: Solve, options: BuildOptions, query_rank: int | None
) -> Queries:
    """Q = (F + damping I)^-1 Gq^T, (P, n_query), compressed to rank ``query_rank`` if given."""
    gq = gradient_matrix(model, query, options)
    return Queries.of(solve(gq.T.contiguous()), query_rank)


@on_plain_model
def influence(
    model: nn.Module,
    train: Any,
    query: Any,
    likelihood: str | Likelihood = "categorical",
    structure: str | Structure | dict | LinearOperator | Tensor = "ekfac",
    damping: float = 1e-3,
    params: Any = None,
    *,
    fisher_type: str = "exact",
    mc_samples: int = 1,
    rank: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    process_group: Any = None,
    kfac_approx: str = "expand",
    cg_tol: float | None = None,
    max_bytes: int | None = MAX_DENSE_BYTES,
    query_rank: int | None = None,
) -> Tensor:
    r"""Influence scores (n_query, n_train): scores[i, j] = g_i^T (F + damping I)^-1 g_j.

    Args:
        model: any ``nn.Module``; left exactly as found.
        train: the training data (DataLoader, iterable of (x, y) batches, or one batch); F is its
            Fisher and its examples are the columns of the scores, in the data's order.
        query: the query examples (same formats), the rows of the scores.
        likelihood: as in :func:`fim_linops.fisher`; g is the gradient of its nll of the
            example's own labels (summed over the kept positions of sequence outputs).
        structure: a structure name ("ekfac", "kfac", "dense", "block_diag", "diag", "lowrank"
            (``rank=``), "quasi_diag", "kron_sum", "implicit"), a per-layer mix, or a prebuilt
            operator (P, P) for the same ``params`` (a ``FisherOperator``, any LinearOperator or
            a dense Tensor).
        damping: delta >= 0 of (F + delta I), exact for every structure.
        params: the parameters to attribute through (as in ``fl.fisher``).
        fisher_type, mc_samples, rank, generator, kfac_approx, process_group: passed to
            ``fl.fisher`` when F is built here.
        device, dtype: where and in which precision everything is computed.
        progress: tqdm progress bars over the batches (F's build and the training pass).
        cg_tol: relative residual of the CG solve (implicit and generic operators; setting it
            forces CG for every operator). Default 1e-10 in float64, 1e-6 in float32.
        max_bytes: as in :func:`fim_linops.fisher` (the memory guard of dense/block storage and
            the budget of each chunk of the exact Fisher's columns), also the budget of each
            chunk of the training examples' per-example gradients (at most 256 MiB).
        query_rank: compress the preconditioned queries Q (P, n_query) to their rank-r
            truncated SVD before the training pass (memory and time of the pass / (n_query / r)).
            Error per training example j: |scores[:, j] - exact[:, j]|_2 <= s_{r+1}(Q) |g_j|_2
            (:mod:`fim_linops.influence.queries`); exact when r >= n_query. None: no compression.

    Returns:
        (n_query, n_train) tensor; with torch.distributed, this rank's shard of the training
        examples (columns in the order of the local data).
    """
    options = BuildOptions.of_arguments(locals())
    solve, _ = _operator(model, train, structure, damping, options, cg_tol)
    q = _preconditioned_queries(model, query, solve, options, query_rank)
    parts, _ = stream_gradients(model, train, q.scores, options)
    if not parts:
        return q.left.new_zeros(q.n_query, 0)
    return torch.cat(parts).T


@on_plain_model
def self_influence(
    model: nn.Module,
    train: Any,
    likelihood: str | Likelihood = "categorical",
    structure: str | Structure | dict | LinearOperator | Tensor = "ekfac",
    damping: float = 1e-3,
    params: Any = None,
    *,
    fisher_type: str = "exact",
    mc_samples: int = 1,
    rank: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    process_group: Any = None,
    kfac_approx: str = "expand",
    cg_tol: float | None = None,
    max_bytes: int | None = MAX_DENSE_BYTES,
) -> Tensor:
    r"""Self-influence (n_train,): s_j = g_j^T (F + damping I)^-1 g_j, the diagonal of
    ``influence(model, train, train, ...)`` without the (n_train, n_train) matrix.

    High self-influence flags examples the model can only fit by bending to them (mislabelled,
    atypical): the usual ranking for data cleaning. One solve per chunk of training examples
    ((P, n_chunk) right-hand sides; CG for implicit); the arguments are those of
    :func:`influence`. With torch.distributed, this rank's shard. A
    :class:`~fim_linops.sharding.ShardedFisher` cannot serve here (its solves are collectives and
    the ranks' shards need different numbers of them): pass a structure name instead."""
    from fim_linops.sharding.operator import ShardedFisher

    if isinstance(structure, ShardedFisher):
        raise ValueError(
            "self_influence needs one solve per chunk of this rank's training data, but the "
            "solves of a ShardedFisher are collectives (all ranks at once); pass a structure "
            "name (e.g. structure='ekfac': every rank then holds the whole operator)"
        )
    options = BuildOptions.of_arguments(locals())
    solve, _ = _operator(model, train, structure, damping, options, cg_tol)

    def diag(blocks: list[Tensor]) -> Tensor:
        g = torch.cat(blocks, dim=-1)  # (n_chunk, P)
        return (g.T * solve(g.T.contiguous())).sum(0)  # s[n] = sum_p g[n, p] (F_d^-1 g^T)[p, n]

    parts, _ = stream_gradients(model, train, diag, options)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)


@on_plain_model
def top_influences(
    model: nn.Module,
    train: Any,
    query: Any,
    k: int = 10,
    likelihood: str | Likelihood = "categorical",
    structure: str | Structure | dict | LinearOperator | Tensor = "ekfac",
    damping: float = 1e-3,
    params: Any = None,
    *,
    largest: bool = True,
    fisher_type: str = "exact",
    mc_samples: int = 1,
    rank: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    process_group: Any = None,
    kfac_approx: str = "expand",
    cg_tol: float | None = None,
    max_bytes: int | None = MAX_DENSE_BYTES,
    query_rank: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The k most helpful (``largest=True``) or most harmful (``largest=False``) training
    examples per query, without the (n_query, n_train) matrix: a running top-k merged chunk by
    chunk (memory (n_query, k + n_chunk)).

    ``query_rank``: as in :func:`influence` (the ranking then follows the compressed scores).

    Returns:
        (values, indices), each (n_query, k): values[i, r] = scores[i, indices[i, r]], sorted
        (descending for ``largest``), indices into the training data's order (with
        torch.distributed, into this rank's shard). Ties keep the lower index first.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    options = BuildOptions.of_arguments(locals())
    solve, _ = _operator(model, train, structure, damping, options, cg_tol)
    q = _preconditioned_queries(model, query, solve, options, query_rank)
    state: dict[str, Tensor] = {
        "values": q.left.new_zeros(q.n_query, 0),
        "indices": torch.zeros(q.n_query, 0, dtype=torch.long, device=q.left.device),
    }
    seen = [0]

    def merge(blocks: list[Tensor]) -> None:
        s = q.scores(blocks).T  # (n_query, n_chunk)
        idx = torch.arange(seen[0], seen[0] + s.shape[1], device=s.device).expand_as(s)
        seen[0] += s.shape[1]
        vals = torch.cat([state["values"], s], dim=1)
        inds = torch.cat([state["indices"], idx], dim=1)
        keep = min(k, vals.shape[1])
        # stable sort: among equal scores the earlier (lower) index stays first
        order = torch.sort(vals, dim=1, descending=largest, stable=True).indices[:, :keep]
        state["values"] = vals.gather(1, order)
        state["indices"] = inds.gather(1, order)

    # (a restart of the pass, layers found to need torch.func, happens in the first batch's
    # forward, before any chunk reaches merge)
    stream_gradients(model, train, merge, options)
    if seen[0] < k:
        raise ValueError(f"k={k} exceeds the number of training examples ({seen[0]})")
    return state["values"], state["indices"]
