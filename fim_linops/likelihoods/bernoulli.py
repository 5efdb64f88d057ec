r"""Bernoulli likelihood on one logit per example or per position."""

from __future__ import annotations

import torch
from torch import Tensor

from fim_linops.likelihoods.base import Likelihood


class Bernoulli(Likelihood):
    r"""Bernoulli likelihood on one logit per example, f of shape (N,) or (N, 1), labels y in
    {0, 1} of shape (N,); or one logit per position, f (N, *T) or (N, *T, 1), labels (N, *T).
    Labels equal to ``ignore_index`` drop their term.

    p = sigmoid(f); H = p (1 - p); S = sqrt(p (1 - p)).
    """

    name = "bernoulli"

    def __init__(
        self, ignore_index: int | None = -100, positions: str = "sum", shift_labels: bool = False
    ):
        self._set_positions(ignore_index, positions, shift_labels)

    def as_positions(self, f: Tensor) -> tuple[Tensor, bool]:
        if f.ndim == 1 or (f.ndim == 2 and f.shape[1] == 1):
            return f.reshape(f.shape[0], 1, 1), False
        if f.ndim >= 2 and not (f.ndim > 2 and f.shape[-1] != 1):
            return f.reshape(f.shape[0], -1, 1), True
        raise ValueError(
            f"bernoulli likelihood expects one logit per example or per position, shape (N,), "
            f"(N, 1), (N, *T) or (N, *T, 1), got {tuple(f.shape)}; use likelihood='categorical' "
            "for several classes"
        )

    def position_mask(self, f: Tensor, y: Tensor | None) -> Tensor | None:
        if y is None or self.ignore_index is None:
            return None
        return (y != self.ignore_index).reshape(f.shape[0], -1)

    def check_target(self, f: Tensor, y: Tensor, values: bool = True) -> Tensor:
        if self.sequence:
            y = self.shifted_labels(y)
            y = y.reshape(y.shape[0], -1) if y.numel() == f.numel() else y
            want = tuple(f.shape)
        else:
            y = y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
            want = tuple(f.shape[:1])
        if tuple(y.shape) != want and self.sequence:
            raise ValueError(
                f"bernoulli likelihood expects one logit per example or per position: the output is "
                f"read as {f.shape[1]} positions of one logit, so the labels must have shape "
                f"{want}, got {tuple(y.shape)}; use likelihood='categorical' for several classes"
            )
        if tuple(y.shape) != want:
            raise ValueError(
                f"bernoulli likelihood expects labels of shape {want}, got {tuple(y.shape)}"
            )
        y = y.to(f.dtype)
        kept = y != self.ignore_index if self.ignore_index is not None else torch.ones_like(y)
        if values and not bool((((y == 0) | (y == 1)) | ~kept.bool()).all()):
            raise ValueError(
                f"bernoulli likelihood expects labels in {{0, 1}} (or ignore_index={self.ignore_index})"
            )
        return y

    def _kept(self, y: Tensor) -> Tensor:
        return torch.ones_like(y) if self.ignore_index is None else (y != self.ignore_index).to(y)

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        y = y.reshape(f.shape[0], -1)
        kept = self._kept(y)
        terms = torch.nn.functional.binary_cross_entropy_with_logits(
            f, torch.where(kept.bool(), y, 0.0), reduction="none"
        )
        return (terms * kept).sum(-1)

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        p = torch.sigmoid(f.detach()).expand(n_samples, -1, -1)
        y = torch.bernoulli(p, generator=generator)
        return y if self.sequence else y[..., 0]

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        y = y.reshape(*y.shape[: y.ndim - (2 if self.sequence else 1)], *f.shape)
        kept = self._kept(y)
        return (torch.sigmoid(f.detach()) - torch.where(kept.bool(), y, 0.0)) * kept

    def _root(self, f: Tensor) -> Tensor:
        p = torch.sigmoid(f.detach())
        return (p * (1 - p)).sqrt()[:, :, None]

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        p = torch.sigmoid(f.detach())
        return p * (1 - p) * v

    def __repr__(self) -> str:
        return f"Bernoulli({self._options()})"
