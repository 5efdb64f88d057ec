r"""Gaussian likelihood N(y; f, sigma^2 I), one term per example or per position."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fim_linops.likelihoods.base import Likelihood


class Gaussian(Likelihood):
    r"""Gaussian likelihood N(y; f, sigma^2 I) on outputs f (N, C) (or (N,): C = 1), targets y
    of the output's shape; or outputs (N, *T, D) with a term per position, targets (N, *T, D)
    (or (N, *T) when D = 1). A position whose target holds a NaN is dropped (the mask of
    padded sequences; a mapping batch without labels uses its attention_mask).

    nll = |y - f|^2 / (2 sigma^2) + C log(sigma sqrt(2 pi)); H = I / sigma^2, S = I / sigma.
    """

    name = "gaussian"

    def __init__(
        self,
        sigma: float | Tensor = 1.0,
        positions: str = "sum",
        shift_labels: bool = False,
    ):
        if not isinstance(sigma, Tensor) and (not math.isfinite(sigma) or sigma <= 0):
            raise ValueError(f"Gaussian sigma must be a positive finite number, got {sigma}")
        self.sigma = sigma
        self._set_positions(None, positions, shift_labels)

    def as_positions(self, f: Tensor) -> tuple[Tensor, bool]:
        """(N, 1, C); a scalar output per example, shape (N,), is taken as (N, 1)."""
        if f.ndim == 1:
            f = f[:, None]
        return super().as_positions(f)

    def position_mask(self, f: Tensor, y: Tensor | None) -> Tensor | None:
        if y is None or not y.is_floating_point():
            return None
        return ~self._rows(y).isnan().any(-1).reshape(f.shape[0], -1)

    def check_target(self, f: Tensor, y: Tensor, values: bool = True) -> Tensor:
        if self.sequence:
            y = self.shifted_labels(y)
            y = y.reshape(y.shape[0], -1) if y.numel() == f.numel() else y
        elif y.shape == f.shape[:1] and f.shape[1] == 1:
            y = y[:, None]
        if y.shape != f.shape:
            raise ValueError(
                f"gaussian likelihood expects targets of the output's shape (flattened: "
                f"{tuple(f.shape)}), got {tuple(y.shape)}"
            )
        return y.to(f.dtype)

    def _clean(self, y: Tensor) -> Tensor:
        return torch.nan_to_num(y, nan=0.0) if y.is_floating_point() else y

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        sigma = torch.as_tensor(self.sigma, dtype=f.dtype, device=f.device)
        kept = ~self._rows(y).isnan().any(-1)  # (N*T,)
        rows = ((self._rows(self._clean(y)) - self._rows(f)) ** 2).sum(-1) / (2 * sigma**2)
        rows = rows + self._rows(f).shape[-1] * torch.log(sigma * math.sqrt(2 * math.pi))
        return (rows * kept).reshape(f.shape[0], -1).sum(-1)

    def sample(self, f: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            (n_samples, *f.shape), dtype=f.dtype, device=f.device, generator=generator
        )
        return f.detach() + self.sigma * noise

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        """(..., N, T*D): (f - y) / sigma^2, zero at positions with a NaN target."""
        g = (f.detach() - self._clean(y)) / self.sigma**2
        if y.is_floating_point():
            nan = self._rows(y).isnan().any(-1, keepdim=True)  # (..., N*T, 1)
            g = self._rows(g).masked_fill(nan, 0.0).reshape(g.shape)
        return g

    def _root(self, f: Tensor) -> Tensor:
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return (eye / self.sigma).expand(f.shape[0], -1, -1)

    def hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        return v / self.sigma**2

    def __repr__(self) -> str:
        default = not isinstance(self.sigma, Tensor) and self.sigma == 1.0
        parts = [] if default else [f"sigma={self.sigma}"]
        opts = self._options()
        return f"Gaussian({', '.join(parts + [opts] if opts else parts)})"
