r"""Whether the rows of a layer's calls are per-example rows: the check that lets KFAC "expand"
take a call's rows as they come.

KFAC "expand" needs, of each layer, only the sums A = sum_r a_r a_r^T and G = sum_r g_r g_r^T over
the rows r of its calls (a row: a call's output or input at all indices but the last, feature,
dim), so any re-layout of the examples' rows is exact: a (B, 2, D) input reshaped into (2B, D)
rows, a time-major (T, N, D) sequence, tokens gathered for an expert. It is exact only when each
row belongs to one example, i.e. when g_r, the gradient w.r.t. row r, is the gradient of one
example's output. A call shared by the examples (a position embedding called on arange(T) and
broadcast over the batch: Hugging Face GPT-2's ``wpe``, BERT's position embeddings) has rows that
every example's output depends on: the batched backward sums their gradients over the examples,
g_r = sum_n g_nr, and G would hold the cross-example terms g_nr g_mr^T (n != m), which depend on
how the data is batched.

:func:`shared_rows` finds such calls on a forward of n >= 2 examples: for each bit b of the example
index, one backward of a random cotangent on the examples whose bit b is 0 and one on those whose
bit b is 1; a row that gets a nonzero gradient from both sides is reached by two examples (any two
examples differ in some bit). 2 ceil(log2 n) backward passes, run once per build and only for the
modules whose calls do not have the examples along their first dim (engine/checks.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: why a module whose calls are shared by the examples cannot take its rows as they come
SHARED_ROWS = (
    "its calls are shared by the examples of a batch (an input without the examples' dim, such "
    "as a position embedding's arange(T)): their output gradients sum over the examples, so "
    "Kronecker factors of their rows would mix the examples"
)


def _rows_reached(g: Tensor | None, o: Tensor) -> Tensor:
    """(rows,) whether each row (all dims but the last) of the call output ``o`` has a nonzero
    gradient ``g`` (None: the output does not reach f)."""
    rows = o.numel() // o.shape[-1] if o.shape[-1] else 0
    if g is None:
        return torch.zeros(rows, dtype=torch.bool, device=o.device)
    return g.ne(0).reshape(rows, -1).any(-1)


def shared_rows(f: Tensor, outputs: dict[int, list[Tensor]]) -> set[int]:
    """The keys of ``outputs`` (key -> the outputs of a module's calls in the forward that made
    ``f``, examples along f's first dim) with a row that the outputs of two examples depend on.
    The graph of ``f`` is kept for the caller's backward. A random cotangent (a fixed seed on a
    private generator: the global random state is untouched) reaches every row that an
    example's output depends on with probability 1."""
    n = f.shape[0] if f.ndim else 1
    flat = [(key, o) for key, os in outputs.items() for o in os if o.ndim > 0]
    if n < 2 or not flat or f.grad_fn is None:
        return set()
    gen = torch.Generator(device=f.device).manual_seed(0)
    r = torch.randn(f.shape, generator=gen, device=f.device, dtype=f.dtype)
    example = torch.arange(n, device=f.device).view(n, *(1,) * (f.ndim - 1))
    shared: set[int] = set()
    for b in range((n - 1).bit_length()):  # bits of the example index, not examples
        side = (example >> b) & 1
        reached = []
        for s in (0, 1):
            gs = torch.autograd.grad(
                f, [o for _, o in flat], grad_outputs=r * (side == s), retain_graph=True,
                allow_unused=True,
            )  # fmt: skip
            reached.append([_rows_reached(g, o) for g, (_, o) in zip(gs, flat, strict=True)])
        for (key, _), r0, r1 in zip(flat, *reached, strict=True):
            if bool((r0 & r1).any()):
                shared.add(key)
    return shared
