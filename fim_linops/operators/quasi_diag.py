r"""Quasi-diagonal Fisher (Ollivier 2015, "Riemannian metrics for neural networks I", sec. 3.3):
the diagonal, plus, for every neuron b, the cross terms between its incoming weights w_{b,:} and its
bias b_b. Per neuron the block is an arrowhead matrix

    F_b = [[diag(D_b), c_b], [c_b^T, beta_b]],  D_b (W,), c_b (W,) = F[w_{b,:}, b_b], beta_b,

and every other entry is zero. Stored: the diagonal d (P,) and the cross terms c (B, W) per paired
layer (about 2P numbers). With damping delta (D <- D + delta, beta <- beta + delta) everything is in
closed form through the Schur complement s_b = beta_b - c_b^T D_b^{-1} c_b:

* solve: y_b = (r_b - c_b^T D_b^{-1} r_w) / s_b,  x_w = D_b^{-1} (r_w - c_b y_b);
* log-determinant: sum log D + sum_b log s_b;
* root: F = L diag(D, s) L^T with L = [[I, 0], [c^T D^{-1}, 1]], so R = [[D^{1/2}, 0],
  [c^T D^{-1/2}, s^{1/2}]] and the inverse root R^{-T} = [[D^{-1/2}, -D^{-1} c s^{-1/2}], [0, s^{-1/2}]].

All O(P) per column. Zero diagonal entries (dead inputs, where the cross term is zero as well) are
treated as pseudo-inverse directions.

The arrowhead blocks need not be positive semi-definite: each term c_j^2 / D_j is at most beta
(Cauchy-Schwarz) but their sum over j can exceed it. Solve and log-determinant stay exact for any
nonsingular F + delta I (the log-determinant is NaN when the determinant is negative, as for
``torch.logdet``); the roots need F + delta I positive definite and say so otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import (
    ExactSolveMixin,
    FisherOperator,
    as_columns,
    from_columns,
    pinv_scale,
)


@dataclass(frozen=True)
class QuasiSpec:
    """A layer whose B neurons each own W weights (row-major at ``w_start``) and a bias
    (at ``b_start``)."""

    name: str
    w_start: int
    b_start: int
    neurons: int
    width: int

    def weights(self, x: Tensor) -> Tensor:
        """(P, m) -> the weight rows (B, W, m)."""
        return x[self.w_start : self.w_start + self.neurons * self.width].reshape(
            self.neurons, self.width, -1
        )

    def bias(self, x: Tensor) -> Tensor:
        """(P, m) -> the bias rows (B, m)."""
        return x[self.b_start : self.b_start + self.neurons]


class QuasiDiag(ExactSolveMixin, FisherOperator):
    r"""Diagonal plus per-neuron weight-bias cross terms.

    Args:
        diag: (P,) the Fisher diagonal.
        cross: per spec, (B, W) the cross terms F[w_{b,j}, b_b].
        specs: the paired layers.
        damping: scalar delta.
    """

    structure = "quasi_diag"

    def __init__(
        self,
        diag: Tensor,
        *cross: Tensor,
        specs: tuple[QuasiSpec, ...] = (),
        damping: Tensor | None = None,
    ):
        if len(cross) != len(specs):
            raise ValueError("QuasiDiag needs one cross-term tensor per spec")
        if damping is None:
            damping = torch.zeros((), dtype=diag.dtype, device=diag.device)
        super().__init__(diag, *cross, specs=tuple(specs), damping=damping)
        self.diag = diag
        self.cross = cross
        self.specs = tuple(specs)

    def _numel(self) -> int:
        return self.diag.shape[-1]

    def _pairs(self):
        return zip(self.specs, self.cross, strict=True)

    def _scaled(self, c: Tensor) -> QuasiDiag:
        return QuasiDiag(
            self.diag * c, *[x * c for x in self.cross], specs=self.specs, damping=self.damping * c
        )

    # -- products --------------------------------------------------------------------------------
    def _matmul_undamped(self, rhs: Tensor) -> Tensor:
        out = self.diag[:, None] * rhs
        for spec, c in self._pairs():
            # b: neuron, w: weight of the neuron, m: column
            spec.weights(out).add_(c[:, :, None] * spec.bias(rhs)[:, None, :])
            spec.bias(out).add_(torch.einsum("bw,bwm->bm", c, spec.weights(rhs)))
        return out

    def _diagonal_undamped(self) -> Tensor:
        return self.diag

    def _trace_undamped(self) -> Tensor:
        return self.diag.sum()

    def _frobenius_sq_undamped(self) -> Tensor:
        return (self.diag**2).sum() + 2 * sum((c**2).sum() for c in self.cross)

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self._numel(), dtype=self.dtype, device=self.device))

    # -- closed-form factorisation ---------------------------------------------------------------
    def _factor(self) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(d + delta, its pseudo-inverse, the per-spec c^T D^{-1} (B, W)); the bias entries of
        ``piv`` (the pivots of L diag(piv) L^T) hold the Schur complements s."""
        dd = self.diag + self.damping
        piv = dd.clone()
        cd = []
        inv = _inv(dd)
        for spec, c in self._pairs():
            ci = c * spec.weights(inv[:, None])[..., 0]  # c / D
            spec.bias(piv[:, None])[:, 0] -= (ci * c).sum(-1)  # s = beta - c^T D^-1 c
            cd.append(ci)
        return dd, piv, cd

    def _solve_cols(self, rhs: Tensor) -> Tensor:
        _, piv, cd = self._factor()
        x = rhs.clone()
        # forward: L z = r  (z_b = r_b - (c/D)^T r_w)
        for spec, ci in zip(self.specs, cd, strict=True):
            spec.bias(x).sub_(torch.einsum("bw,bwm->bm", ci, spec.weights(rhs)))
        x = _inv(piv)[:, None] * x
        # backward: L^T x = z  (x_w = z_w - (c/D) x_b)
        for spec, ci in zip(self.specs, cd, strict=True):
            spec.weights(x).sub_(ci[:, :, None] * spec.bias(x)[:, None, :])
        return x

    def logdet(self) -> Tensor:
        piv = self._factor()[1]
        negative = (piv < 0).sum() % 2 == 1
        ld = torch.log(piv.abs()).sum()
        return torch.where(negative, torch.full_like(ld, float("nan")), ld)

    def _root_parts(self, inverse: bool) -> tuple[Tensor, list[Tensor]]:
        dd, piv, cd = self._factor()
        tol = piv.abs().amax() * piv.shape[0] * torch.finfo(piv.dtype).eps
        if bool((piv < -tol).any()):
            raise ValueError(
                "the quasi-diagonal Fisher plus damping is indefinite here (Ollivier's per-neuron "
                "arrowhead blocks need not be PSD), so it has no real root; add more damping with "
                "F.add_diagonal(...)"
            )
        if not inverse:  # R = L diag(piv)^{1/2}: lower entries (b, w) = c D^{-1/2}
            t = piv.clamp_min(0).sqrt()
            return t, [
                ci * spec.weights(t[:, None])[..., 0]
                for spec, ci in zip(self.specs, cd, strict=True)
            ]
        t = pinv_scale(
            piv, -0.5
        )  # R^{-T} = L^{-T} diag(piv)^{-1/2}: upper entries (w, b) = -c/D s^{-1/2}
        return t, [-ci * spec.bias(t[:, None]) for spec, ci in zip(self.specs, cd, strict=True)]

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        """R R^T = F + delta I with R = L diag(pivots)^{1/2}, exact and O(P)."""
        from linear_operator.operators import RootLinearOperator

        t, off = self._root_parts(inverse=False)
        return RootLinearOperator(ArrowTriangular(t, *off, specs=self.specs, upper=False))

    def root_inv_decomposition(
        self, initial_vectors=None, test_vectors=None, method=None
    ) -> LinearOperator:
        """S S^T = (F + delta I)^-1 with S = L^{-T} diag(pivots)^{-1/2}, exact and O(P)."""
        from linear_operator.operators import RootLinearOperator

        t, off = self._root_parts(inverse=True)
        return RootLinearOperator(ArrowTriangular(t, *off, specs=self.specs, upper=True))

    def _symeig(self, eigenvectors: bool = False, return_evals_as_lazy: bool | None = False):
        raise NotImplementedError(
            "QuasiDiag has no closed-form eigendecomposition (arrowhead blocks); use its exact "
            "solve/logdet/root, or fl.spectral.lanczos(F, k)"
        )


def _inv(x: Tensor) -> Tensor:
    """1/x, with entries at round-off level (relative to max |x|) treated as zero (pseudo-inverse)."""
    tol = x.abs().amax() * x.shape[-1] * torch.finfo(x.dtype).eps
    big = x.abs() > tol
    return torch.where(big, 1 / torch.where(big, x, torch.ones_like(x)), torch.zeros_like(x))


class ArrowTriangular(LinearOperator):
    r"""diag(t) plus, per spec, one off-diagonal entry per weight linking it to its neuron's bias:
    at (row bias b, column weight (b, w)) when lower, at (row weight (b, w), column bias b) when
    upper. Transposing swaps the two."""

    def __init__(self, t: Tensor, *off: Tensor, specs: tuple[QuasiSpec, ...], upper: bool):
        super().__init__(t, *off, specs=specs, upper=upper)
        self.t = t
        self.off = off
        self.specs = specs
        self.upper = upper

    def _size(self) -> torch.Size:
        return torch.Size([self.t.shape[0], self.t.shape[0]])

    def _transpose_nonbatch(self) -> LinearOperator:
        return ArrowTriangular(self.t, *self.off, specs=self.specs, upper=not self.upper)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vector = as_columns(rhs)
        out = self.t[:, None] * cols
        for spec, o in zip(self.specs, self.off, strict=True):
            if self.upper:
                spec.weights(out).add_(o[:, :, None] * spec.bias(cols)[:, None, :])
            else:
                spec.bias(out).add_(torch.einsum("bw,bwm->bm", o, spec.weights(cols)))
        return from_columns(out, shape, vector)

    def to_dense(self) -> Tensor:
        return self._matmul(torch.eye(self.shape[-1], dtype=self.dtype, device=self.device))
