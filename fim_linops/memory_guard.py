r"""Memory guards for function-space results: count the bytes of a tensor before allocating it.

Dense Jacobians (N*C, P), dense NTK Grams (N1*C, N2*C), joint predictive covariances
(N*C, N*C) and dense posteriors (P, P) grow quadratically; each entry point checks the size of
what it is about to allocate against ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`, the same
8 GiB as ``fl.fisher``'s) and raises :class:`MemoryLimitError` naming what fits instead.
"""

from __future__ import annotations

import math

import torch

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
