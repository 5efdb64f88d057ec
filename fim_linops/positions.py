r"""Per-position outputs (sequences, language models): each position of an output (N, *T, C) is a
term of the likelihood.

The engine sees the output flattened row-major to (N, T*C) (T the product of the position dims),
so every per-example statistic stays per sequence. The output Hessian of one example is block
diagonal, H_n = blockdiag_t(m_nt H_nt) with m_nt in {0, 1} the position mask (labels equal to
``ignore_index`` drop their position). Its square root has T*K0 columns (K0 per position); column
(t, k) is non-zero only at position t, so the exact Fisher's columns are made per position range
(:func:`block_columns`) and back-propagated in chunks that fit a memory budget.

Shapes: N examples, T positions, C outputs per position, K0 root columns per position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fim_linops.enums import ParsedEnum


class Positions(ParsedEnum):
    """How the terms of the positions are normalised."""

    SUM = "sum"  # F = 1/N sum_n sum_{t kept} E[g_nt g_nt^T]
    MEAN = "mean"  # divided by the number of kept positions in all the data instead

    @classmethod
    def _kind(cls) -> str:
        return "positions"

    @classmethod
    def _choices(cls) -> str:
        return "'sum' (the Fisher of each sequence, averaged over sequences) or 'mean' (per kept position)"


def check_ignore_index(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"ignore_index must be an int or None, got {value!r}")
    return value


def block_columns(s: Tensor, mask: Tensor | None, lo: int, hi: int) -> Tensor:
    r"""Columns V ((hi-lo)*K0, N, T*C) of the block-diagonal root for positions lo:hi.

    ``s`` (N, T, C, K0) holds each position's root S_nt (S_nt S_nt^T = H_nt); ``mask`` (N, T) or
    None. V[(t-lo)*K0 + k, n, t'*C + c] = delta_{t t'} m_nt S_nt[c, k].
    """
    n, t, c, k0 = s.shape
    part = s[:, lo:hi]
    if mask is not None:
        part = part * mask[:, lo:hi, None, None].to(s.dtype)
    v = torch.zeros(hi - lo, k0, n, t, c, dtype=s.dtype, device=s.device)
    idx = torch.arange(hi - lo, device=s.device)
    # u: position of the column (relative to lo); v[u, k, n, lo+u, c] = part[n, u, c, k]
    v[idx, :, :, idx + lo, :] = part.permute(1, 3, 0, 2)
    return v.reshape((hi - lo) * k0, n, t * c)


def flat_mask(mask: Tensor, width: int) -> Tensor:
    """(N, T) position mask -> (N, T*C) mask of the flat output (row-major)."""
    return mask.repeat_interleave(width, dim=1)


def mapping_mask(x: Any, positions: int, shift: bool) -> Tensor | None:
    """The kept positions (N, T) of a mapping batch without labels: its ``attention_mask`` (shifted
    like the labels when ``shift``), None without one."""
    if not isinstance(x, dict) or not isinstance(x.get("attention_mask"), Tensor):
        return None
    m = x["attention_mask"]
    m = m[:, 1:] if shift else m
    m = m.reshape(m.shape[0], -1)
    if m.shape[1] != positions:
        raise ValueError(
            f"the batch's attention_mask covers {m.shape[1]} positions but the model output has "
            f"{positions}; pass labels (ignore_index marks the dropped positions) instead"
        )
    return m != 0
