r"""The back-propagated columns of one batch, made and back-propagated a range at a time.

Shapes: N examples, T positions, C outputs per position (the engine's flat output is (N, T*C)),
K0 root columns per position, K columns in all.

The exact Fisher of per-position outputs has K = T*K0 columns (K0 = C - 1 for a categorical
output), each as large as the output: V alone would take K*N*T*C numbers, T^2 C^2 N (a (8, 16,
8,000) output: 512 GB in float32). :class:`RootColumns` therefore makes any range of columns on
demand, from the output rows (column j = t*K0 + k is m_nt S_nt[:, k] at position t, zero
elsewhere), and the engine back-propagates them in chunks whose working memory fits
``max_bytes`` (:func:`column_step`), handing each chunk's statistics over before the next one
(``Engine.run(stream=True)``): memory is bounded by one chunk, whatever T and C.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fim_linops.likelihoods import Likelihood
from fim_linops.positions import block_columns

#: back-propagated chunks per batch above which the exact Fisher refuses to start: even a tiny
#: model's backward takes a millisecond, so this is at least a quarter of an hour per batch
MAX_PASSES = 1_000_000

#: copies of the torch.func parameters' per-example gradients (K, n, p) alive at once while they
#: are made: vjp under vmap holds the gradient of each use of a parameter and their sum (a tied LM
#: head: the head's and the embedding's (K, n, V, d) gradients and their sum; measured 3.0x the
#: result's bytes on bench_vocab's model)
FUNC_COPIES = 3


def per_example_workspace(
    ruled_numel: list[int], calls: list[tuple[int, Tensor, Tensor]], p_func: int
) -> int:
    """Numbers per column and example that the statistics form beyond the captured outputs:
    :data:`FUNC_COPIES` times the torch.func parameters ``p_func`` plus the per-example gradients
    (K, n, p_b) of the widest ruled block whose gradient sums over several positions or calls
    (the diagonal's workspace, ``Rule.diag_workspace``; also what EKFAC, kron_sum, quasi_diag
    project, which make their temporaries from it a slice at a time,
    :meth:`~fim_linops.engine.result.BatchResult.slices`). Positions: T of features a (n, *T, i),
    every id of token ids a (n, *T) (an Embedding). ``ruled_numel[i]``: p of ruled block i;
    ``calls``: (ruled index, a, output) of the batch."""
    count: dict[int, int] = {}
    for i, a, _ in calls:
        if a.is_floating_point():  # features a (n, *T, i): several when T > 1
            several = a.ndim > 2 and a[0].numel() != a.shape[-1]
        else:  # token ids a (n, *T) (Embedding): one position per id
            several = a[0].numel() > 1
        count[i] = count.get(i, 0) + (2 if several else 1)
    widest = max((ruled_numel[i] for i, c in count.items() if c > 1), default=0)
    return FUNC_COPIES * p_func + widest


def column_ranges(k: int, step: int) -> list[tuple[int, int]]:
    """The ranges [lo, hi) of K columns back-propagated ``step`` at a time."""
    return [(lo, min(k, lo + step)) for lo in range(0, k, step)]


def column_block(cols: Columns, lo: int, hi: int, f: Tensor) -> Tensor:
    """V[lo:hi] (hi - lo, N, C) in f's dtype; an empty range is one zero column (a backward pass
    that adds nothing: ranks that must run as many passes as another pad with it)."""
    if hi > lo:
        return cols.chunk(lo, hi).to(f.dtype)
    return f.new_zeros(1, *f.shape)


class Columns:
    """K columns V (K, N, C) of one batch, a range at a time."""

    k: int
    #: K0 and T, for messages (one position, K columns, for given columns)
    per_position: int
    positions: int

    def chunk(self, lo: int, hi: int) -> Tensor:  # pragma: no cover - abstract
        """V[lo:hi], (hi - lo, N, C)."""
        raise NotImplementedError


class GivenColumns(Columns):
    """Columns already formed (MC samples, the empirical gradient, recorded columns, small
    exact roots)."""

    def __init__(self, v: Tensor):
        self.v = v
        self.k = self.per_position = v.shape[0]
        self.positions = 1

    def chunk(self, lo: int, hi: int) -> Tensor:
        return self.v[lo:hi]


#: at most this many entries (K, N, T*C), the exact columns are formed all at once and sliced
WHOLE_NUMEL = 1 << 22


class RootColumns(Columns):
    r"""The exact Fisher's columns of the block-diagonal output-Hessian root:
    V[t*K0 + k, n, t'*C + c] = delta_{t t'} m_nt S_nt[c, k] (S_nt S_nt^T = H_nt, m the position
    mask), made for any range of j = t*K0 + k without forming the roots of other columns."""

    def __init__(self, likelihood: Likelihood, f: Tensor, mask: Tensor | None):
        """``f`` (N, T*C) the flat output, ``mask`` (N, T) kept positions or None."""
        self.likelihood = likelihood
        n = f.shape[0]
        self.rows = likelihood._rows(f.detach()).reshape(n, -1, likelihood.width or f.shape[1])
        self.positions, self.c = self.rows.shape[1], self.rows.shape[2]
        self.per_position = likelihood.root_width(self.c)
        self.k = self.positions * self.per_position
        self.mask = mask
        self._whole: Tensor | None = None

    def whole(self) -> Tensor:
        """All K columns at once (K, N, T*C), from the per-row roots in one vectorised step: for
        outputs whose columns are few and small, where forming them a range at a time
        (:meth:`chunk`) costs more than they do."""
        if self._whole is None:
            n, t_all, c = self.rows.shape
            s = self.likelihood._root(self.rows.reshape(-1, c)).reshape(n, t_all, c, -1)
            self._whole = block_columns(s, self.mask, 0, t_all)
        return self._whole

    def chunk(self, lo: int, hi: int) -> Tensor:
        # j: column, n: example, t: its position, k: its root column, c: output
        n, t_all, c = self.rows.shape
        if self.k * n * t_all * c <= WHOLE_NUMEL:
            return self.whole()[lo:hi]
        j = torch.arange(lo, hi, device=self.rows.device)
        t, k = j // self.per_position, j % self.per_position
        rows = self.rows[:, t].transpose(0, 1).reshape(-1, c)  # (J*N, C): row (j, n)
        cols = self.likelihood.root_columns(rows, k.repeat_interleave(n)).reshape(-1, n, c)
        if self.mask is not None:
            cols = cols * self.mask[:, t].T[:, :, None].to(cols.dtype)
        v = torch.zeros(hi - lo, n, t_all, c, dtype=cols.dtype, device=cols.device)
        v[torch.arange(hi - lo, device=v.device), :, t] = cols  # v[j, n, t_j, c]
        return v.reshape(hi - lo, n, t_all * c)


def streams_roots(likelihood: Likelihood) -> bool:
    """Whether the likelihood's exact columns come from per-row roots (``_root``, so
    :class:`RootColumns` applies) rather than from a user-defined ``hessian_sqrt`` only."""
    cls = type(likelihood)
    return cls._root is not Likelihood._root and cls.hessian_sqrt is Likelihood.hessian_sqrt


def column_step(
    outputs: list[Tensor],
    cols: Columns,
    f: Tensor,
    max_bytes: int | None,
    warned: bool,
    per_example: int = 0,
) -> int:
    """Columns per backward pass so that the pass's working memory fits ``max_bytes`` (None: all
    at once): per column about one copy of the captured outputs and one of the output, plus
    ``per_example`` numbers (the torch.func parameters, whose per-example gradients (K, n, p)
    are always formed, for at least one example at a time).
    Warns (unless ``warned``) when this takes several passes, and raises when it would take more
    than :data:`MAX_PASSES`; both say how many and suggest ``fisher_type='mc'``."""
    per_column = (sum(o.numel() for o in outputs) + f.numel() + per_example) * f.element_size()
    if max_bytes is None:
        return max(cols.k, 1)
    step = max(1, min(cols.k, max_bytes // max(per_column, 1)))
    passes = -(-cols.k // step)
    if passes <= 1:
        return step
    what = (
        f"the exact Fisher back-propagates {cols.k:,} columns per batch ({cols.positions:,} "
        f"positions x {cols.per_position:,} root columns, C - 1 for a categorical output of C "
        f"classes), each of {per_column:,} bytes of working memory: {passes:,} backward passes "
        f"of {step:,} columns per batch within max_bytes={max_bytes:,}"
    )
    mc = (
        "fisher_type='mc' back-propagates one column per sample whatever the vocabulary size "
        "(mc_samples=...)"
    )
    if passes > MAX_PASSES:
        raise ValueError(
            f"{what}, over {MAX_PASSES:,}. Use {mc}; or structure='implicit' (exact products "
            "without columns); or fewer positions per batch or a larger max_bytes"
        )
    if not warned:
        warnings.warn(f"{what}. {mc}", RuntimeWarning, stacklevel=5)
    return step


def backward_chunk(f: Tensor, outputs: list[Tensor], v: Tensor, last: bool) -> tuple:
    """J_out^T V for the columns V (J, N, C): one gradient (J, *o.shape) per captured output
    (None where the output does not reach f); the graph is kept unless ``last``."""
    if v.shape[0] == 1:  # one column: no batching
        one = torch.autograd.grad(
            f, outputs, grad_outputs=v[0], allow_unused=True, retain_graph=not last
        )
        return tuple(None if g is None else g[None] for g in one)
    return torch.autograd.grad(
        f, outputs, grad_outputs=v, is_grads_batched=True, allow_unused=True, retain_graph=not last
    )
