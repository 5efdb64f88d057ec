r"""Memory guards for function-space results: count the bytes of a tensor before allocating it.

Dense Jacobians (N*C, P), dense NTK Grams (N1*C, N2*C), joint predictive covariances
(N*C, N*C) and dense posteriors (P, P) grow quadratically; each entry point checks the size of
what it is about to allocate against ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`, the same
8 GiB as ``fl.fisher``'s) and raises :class:`MemoryLimitError` naming what fits instead.

:func:`fitting_structures` says which Fisher structures fit the same budget, from what each one
stores for a layout (:func:`stored_elements`), so that an error never suggests a structure that
would fail the same check (``block_diag`` of an 11M-parameter ResNet needs 140,000 GiB).
"""

from __future__ import annotations

import math

import torch

from fim_linops.engine.rules import rule_for
from fim_linops.layout import LayerBlock, ParamLayout
from fim_linops.structures import Structure

#: default limit of one guarded allocation, bytes (``fl.fisher`` uses the same)
DEFAULT_MAX_BYTES = 8 * 1024**3


class MemoryLimitError(ValueError, MemoryError):
    """A guarded allocation would exceed ``max_bytes``. A ``ValueError`` (bad request for the
    memory allowed) and a ``MemoryError`` (as ``fl.fisher``'s guard raises)."""


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} bytes"


def check_bytes(
    what: str, shape: tuple[int, ...], dtype: torch.dtype, max_bytes: int | None, fix: str
) -> None:
    """Raise :class:`MemoryLimitError` if a ``shape`` tensor of ``dtype`` exceeds ``max_bytes``.

    Args:
        what: what would be allocated, e.g. "the dense Jacobian".
        shape: its shape.
        dtype: its dtype.
        max_bytes: the limit in bytes; None disables the check.
        fix: what to do instead (a structure that fits, a smaller batch).
    """
    if max_bytes is None:
        return
    need = nbytes(shape, dtype)
    if need > max_bytes:
        raise MemoryLimitError(
            f"{what} of shape {tuple(shape)} needs {_human(need)}, over the limit of "
            f"{_human(max_bytes)}; {fix}, or pass max_bytes=... (None: no limit) to allow it"
        )


def _kron_elements(block: LayerBlock) -> int:
    """Entries of the block's Kronecker factors, groups (rows^2 + cols^2), where the layer has a
    Kronecker rule; else of an exact (p_b, p_b) block."""
    rule = rule_for(block.module)
    if rule is None or not rule.has_kfac or not set(block.local_names) <= set(rule.param_names):
        return block.numel**2
    groups, rows, cols = rule.kron_shape(block.module, block.local_names)
    return groups * (rows * rows + cols * cols)


def stored_elements(structure: Structure, layout: ParamLayout) -> int | None:
    """Entries a Fisher of this structure stores for the layout (None: it depends on ``rank``).
    dense P^2; block_diag sum_b p_b^2; kfac the factors (exact blocks for layers without a
    Kronecker rule); ekfac those plus P eigenvalues; diag P; quasi_diag 2 P; implicit P (it stores
    no matrix: its products hold a few P-vectors)."""
    p = layout.numel
    if structure is Structure.DENSE:
        return p * p
    if structure is Structure.BLOCK_DIAG:
        return sum(b.numel**2 for b in layout.blocks)
    if structure in (Structure.KFAC, Structure.EKFAC):
        kron = sum(_kron_elements(b) for b in layout.blocks)
        return kron + (p if structure is Structure.EKFAC else 0)
    if structure is Structure.QUASI_DIAG:
        return 2 * p
    if structure in (Structure.DIAG, Structure.IMPLICIT):
        return p
    return None


def fitting_structures(
    layout: ParamLayout,
    dtype: torch.dtype,
    max_bytes: int,
    candidates: tuple[Structure, ...],
    lowrank: bool = False,
) -> str:
    """``use structure='kfac' (stores 12.0 MiB), 'diag' (...) or 'implicit'`` for the candidates
    whose storage fits ``max_bytes``; with ``lowrank``, also ``'lowrank' with rank <= k`` (U of
    shape (P, k) fits). What to say when none fits: fewer parameters (``params=``)."""
    item = torch.empty((), dtype=dtype).element_size()
    names = []
    for s in candidates:
        n = stored_elements(s, layout)
        if n is not None and n * item <= max_bytes:
            names.append(
                "'implicit' (matrix-free products)"
                if s is Structure.IMPLICIT
                else f"'{s.value}' (stores {_human(n * item)})"
            )
    k = max_bytes // max(1, layout.numel * item)
    if lowrank and k >= 1:
        names.append(f"'lowrank' with rank <= {k:,}")
    if not names:
        return "restrict params= to fewer parameters"
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return f"use structure={listed}"
