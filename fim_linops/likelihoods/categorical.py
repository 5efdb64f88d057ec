r"""Categorical likelihood on logits, one term per example or per position."""

from __future__ import annotations

import torch
from torch import Tensor

from fim_linops.likelihoods.base import Likelihood


class Categorical(Likelihood):
    r"""Categorical likelihood on logits f (N, C), or (N, *T, C) with a term per position:
    p = softmax(f) over the classes (last dim), labels are class indices (N,) or (N, *T), or soft
    (probability) targets (N, C), floating, each row a distribution over the classes (outputs
    (N, C) only).

    H = diag(p) - p p^T per position; its square root S = diag(sqrt p) - p sqrt(p)^T, i.e.
    column k of S is sqrt(p_k) (e_k - p), so that S S^T = diag(p) - p p^T (using sum p = 1).
    Labels equal to ``ignore_index`` drop their term (padding, prompts). H, so the exact and MC
    Fishers, does not depend on the labels. Soft targets q: nll = -sum_c q_c log p_c (the soft
    cross-entropy) and d nll / d f = p - q (sum_c q_c = 1), which the empirical Fisher uses.
    """

    name = "categorical"

    def __init__(
        self, ignore_index: int | None = -100, positions: str = "sum", shift_labels: bool = False
    ):
        self._set_positions(ignore_index, positions, shift_labels)

    def _kept(self, y: Tensor) -> Tensor | None:
        return None if self.ignore_index is None else y != self.ignore_index

    def position_mask(self, f: Tensor, y: Tensor | None) -> Tensor | None:
        if y is None or self.ignore_index is None:
            return None
        return (y != self.ignore_index).reshape(f.shape[0], -1)

    def check_target(self, f: Tensor, y: Tensor, values: bool = True) -> Tensor:
        terms = self._terms(f)
        if not self.sequence:
            if y.ndim == 2 and y.shape == f.shape and y.is_floating_point():
                return self._check_soft(y.to(f.dtype), values)
            want: tuple[int, ...] = (f.shape[0],)
        else:
            y = self.shifted_labels(y)
            want = (f.shape[0], terms)
            y = y.reshape(f.shape[0], -1) if y.ndim >= 2 and y[0].numel() == terms else y
        if tuple(y.shape) != want or y.is_floating_point() or y.is_complex():
            read = (
                f"the output is read as {terms} positions of {self.width} classes (outputs "
                f"(N, *T, C)), so the labels must be integer class indices of shape (N, *T) "
                f"({want} with the positions flattened"
                + (
                    ", one label more per sequence with shift_labels=True"
                    if self.shift_labels
                    else ""
                )
                + ")"
                if self.sequence
                else f"the labels must be integer class indices of shape {want}"
            )
            raise ValueError(
                f"categorical likelihood: {read}, got {tuple(y.shape)} of dtype {y.dtype}"
            )
        if values and y.numel():
            kept = self._kept(y)
            z = y if kept is None else torch.where(kept, y, 0)
            c = self.width or f.shape[-1]
            if bool((z.min() < 0) | (z.max() >= c)):
                raise ValueError(
                    f"categorical labels out of range: the model has {c} classes, labels must lie "
                    f"in [0, {c - 1}] or equal ignore_index={self.ignore_index} (got min "
                    f"{int(y.min())}, max {int(y.max())})"
                )
        return y.long()  # any integer dtype in, int64 indices out (a no-op for int64)

    @staticmethod
    def _check_soft(q: Tensor, values: bool) -> Tensor:
        """Soft targets (N, C): each row non-negative and summing to 1 (checked with ``values``)."""
        if values and q.numel():
            sums = q.sum(-1)
            tol = 1e-3 if q.dtype in (torch.float16, torch.bfloat16) else 1e-5
            if bool((q < 0).any()) or not bool(((sums - 1).abs() <= tol).all()):
                raise ValueError(
                    "categorical soft targets of shape (N, C) must be probabilities: non-negative, "
                    f"each row summing to 1 (got min {float(q.min()):.3g}, row sums in "
                    f"[{float(sums.min()):.6g}, {float(sums.max()):.6g}]); normalise them "
                    "(e.g. y / y.sum(-1, keepdim=True)), or pass class indices of shape (N,)"
                )
        return q

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        """(N,): the sum over the kept positions of -log p(y_t | f_t)."""
        if y.is_floating_point():  # soft targets (N, C): -sum_c q_c log softmax(f)_c
            return -(y * torch.log_softmax(f, dim=-1)).sum(-1)
        ii = -100 if self.ignore_index is None else self.ignore_index
        rows = self._rows(f)
        out = torch.nn.functional.cross_entropy(
            rows, y.reshape(-1).long(), reduction="none", ignore_index=ii
        )
        return out.reshape(f.shape[0], -1).sum(-1)

    def _shape_labels(self, y: Tensor, f: Tensor) -> Tensor:
        """(S, N*T) sampled labels -> (S, N) or (S, N, T)."""
        return y.reshape(y.shape[0], f.shape[0], -1) if self.sequence else y

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """(S, N) (or (S, N, T)) labels y ~ softmax(f)."""
        p = torch.softmax(self._rows(f.detach()), dim=-1)
        return self._shape_labels(self._sample(p, n_samples, generator), f)

    @staticmethod
    def _sample(p: Tensor, n_samples: int, generator: torch.Generator | None) -> Tensor:
        """(S, R) labels from the probabilities p (R, C) by inverting the CDF:
        y = #{c : cdf_c < u}, u ~ U[0, 1) (one uniform per draw; about 5x faster than
        ``torch.multinomial`` on small C)."""
        u = torch.rand(p.shape[0], n_samples, dtype=p.dtype, device=p.device, generator=generator)
        y = torch.searchsorted(p.cumsum(-1), u)  # (R, S); cdf rows are sorted
        return y.clamp_(max=p.shape[-1] - 1).T.contiguous()  # round-off may leave cdf_C < u

    @staticmethod
    def _grad(p: Tensor, y: Tensor) -> Tensor:
        """p - onehot(y), shape (*y.shape, C), for labels y (R,) or (S, R)."""
        minus_one = torch.full((*y.shape, 1), -1.0, dtype=p.dtype, device=p.device)
        return p.expand(*y.shape, -1).scatter_add(-1, y.unsqueeze(-1), minus_one)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        """(..., N, T*C): p - onehot(y) per position, zero at ignored positions."""
        p = torch.softmax(self._rows(f.detach()), dim=-1)  # (N*T, C)
        if y.is_floating_point():  # soft targets q (N, C), outputs (N, C): p - q
            return p - y.to(p.dtype)
        y = y.reshape(*y.shape[: y.ndim - (2 if self.sequence else 1)], -1)  # (..., N*T)
        kept = self._kept(y)
        if kept is None:
            return self._grad(p, y).reshape(*y.shape[:-1], *f.shape)
        g = self._grad(p, torch.where(kept, y, 0)) * kept[..., None].to(p.dtype)
        return g.reshape(*y.shape[:-1], *f.shape)

    def sampled_grad_output(
        self, f: Tensor, n_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        p = torch.softmax(self._rows(f.detach()), dim=-1)  # once for both the draw and the gradient
        return self._grad(p, self._sample(p, n_samples, generator)).reshape(n_samples, *f.shape)

    def _root(self, f: Tensor) -> Tensor:
        r"""A root with C - 1 columns (H has rank C - 1: H 1 = 0), so that the exact Fisher
        back-propagates one column fewer. Start from the square root
        S0[n, c, k] = sqrt(p_nk) (delta_ck - p_nc), whose null vector is sqrt(p_n) (unit norm),
        and apply the Householder reflection Q = I - 2 w w^T / |w|^2, w = sqrt(p_n) + e_last,
        which maps sqrt(p_n) to -e_last: S0 Q has a zero last column, and S0 Q Q^T S0^T = H.
        Column k < C - 1 of S0 Q is S0[:, k] - 2 S0[:, last] w_k / |w|^2 (|w|^2 >= 2: stable).
        Shape (R, C, C - 1) for rows (R, C); (R, 1, 1) zeros for a single class."""
        p = torch.softmax(f.detach(), dim=-1)  # (R, C)
        sq = p.sqrt()
        c = f.shape[-1]
        eye = torch.eye(c, dtype=f.dtype, device=f.device)
        s0 = (eye[None] - p[:, :, None]) * sq[:, None, :]  # S0[n, c, k]
        if c == 1:
            return s0
        w_norm2 = 2 + 2 * sq[:, -1:]  # (R, 1)
        coef = 2 * sq[:, :-1] / w_norm2  # (R, C-1): 2 w_k / |w|^2
        # S[n, c, k] = S0[n, c, k] - S0[n, c, last] coef[n, k]
        return s0[:, :, :-1] - s0[:, :, -1:] * coef[:, None, :]

    def root_width(self, c: int) -> int:
        return c - 1 if c > 1 else 1

    def root_columns(self, rows: Tensor, k: Tensor) -> Tensor:
        """Column k[r] of :meth:`_root` for each row, (R, C), in O(R C): the same arithmetic as
        the full root, S[:, k] = S0[:, k] - S0[:, last] coef_k with S0[:, j] = sqrt(p_j)
        (e_j - p), never the (R, C, C - 1) root itself."""
        p = torch.softmax(rows.detach(), dim=-1)  # (R, C)
        sq = p.sqrt()
        c = rows.shape[-1]
        r = torch.arange(rows.shape[0], device=rows.device)
        col = (torch.zeros_like(p).index_put_((r, k), p.new_ones(())) - p) * sq[r, k][:, None]
        if c == 1:
            return col
        last = torch.zeros_like(p)
        last[:, -1] = 1
        s0_last = (last - p) * sq[:, -1:]  # S0[:, last]
        coef = 2 * sq[r, k] / (2 + 2 * sq[:, -1])  # 2 w_k / |w|^2
        return col - s0_last * coef[:, None]

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        """H v per position for v (..., N, T*C)."""
        p = torch.softmax(self._rows(f.detach()), dim=-1)
        vr = self._rows(v) if v.ndim >= 2 else v
        return (p * vr - p * (p * vr).sum(-1, keepdim=True)).reshape(v.shape)

    def __repr__(self) -> str:
        return f"Categorical({self._options()})"
