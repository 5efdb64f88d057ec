r"""The preconditioned queries Q = (F + damping I)^-1 Gq^T (P, n_query), optionally compressed.

Scoring a chunk of training gradients G (n_chunk, P) is S = G Q (n_chunk, n_query), one layout
block at a time: S = sum_b G_b Q_b with G_b (n_chunk, p_b) and Q_b the block's rows of Q.

Low-rank compression (``query_rank=r``): the truncated SVD Q ~ Q_r = U_r diag(s_r) V_r^T (the best
rank-r approximation, Eckart-Young) is stored as L = U_r diag(s_r) (P, r) and R = V_r^T
(r, n_query), and S ~ (G L) R: the training pass multiplies by P x r instead of P x n_query
numbers (memory and time of the pass fall by n_query / r). The error is exact to state: for
training example j with gradient g_j, the column of the scores changes by (Q - Q_r)^T g_j, so

    | scores[:, j] - scores_r[:, j] |_2 <= s_{r+1} |g_j|_2,

s_{r+1} the (r+1)-th singular value of Q (0 when r >= rank Q: then the scores are exact). The
singular values are kept on the object (``singular_values``) so the bound can be read off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Queries:
    """Q = left @ right when ``right`` is given (compressed), else Q = left (P, n_query)."""

    left: Tensor  # (P, n_query), or (P, r) when compressed
    right: Tensor | None = None  # (r, n_query)
    singular_values: Tensor | None = None  # all singular values of Q, when compressed

    @property
    def n_query(self) -> int:
        return int(self.left.shape[1] if self.right is None else self.right.shape[1])

    @classmethod
    def of(cls, q: Tensor, rank: int | None) -> Queries:
        """Q itself (``rank`` None, or not below n_query), or its rank-``rank`` truncated SVD."""
        if rank is None:
            return cls(q)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"query_rank must be a positive integer or None, got {rank!r}")
        if rank >= min(q.shape):  # no compression possible: keep Q exact
            return cls(q)
        u, s, vh = torch.linalg.svd(q, full_matrices=False)  # q = u diag(s) vh
        return cls(u[:, :rank] * s[:rank], vh[:rank], s)

    def scores(self, blocks: list[Tensor]) -> Tensor:
        """(n_chunk, n_query) = sum_b G_b L_b (then @ R when compressed); G_b (n_chunk, p_b)."""
        out = None
        lo = 0
        for g in blocks:
            hi = lo + g.shape[-1]
            part = g @ self.left[lo:hi]  # s[n, i] = sum_p g[n, p] q[p, i]
            out = part if out is None else out + part
            lo = hi
        if out is None:
            raise ValueError("the model has no parameters selected by params=")
        return out if self.right is None else out @ self.right  # (n, r) @ (r, n_query)
