r"""Which parameterisation of Q each block of the flat parameter vector gets, its auxiliary
parameters lambda, their initialisation, and the block's LinearOperator.

Blocks are the per-module slices of :class:`fim_linops.layout.ParamLayout`. An ``nn.Linear`` or an
``nn.Conv2d`` with ``groups=1`` whose trainable parameters are its weight (and bias) gets the
chosen Kronecker structure over U = [W | b] (rows = out, cols = in*kh*kw + has_bias):

=============  ========================  ======================================================
structure      lambda                    Q (block)
=============  ========================  ======================================================
``kron``       R (rows^2), L (cols^2)    R^T R kron L L^T
``kron_diag``  R, L, d (rows x cols)     D (R^T R kron L L^T) D
``kron_sum``   R1, L1, R2, L2            R1^T R1 kron L1 L1^T + R2^T R2 kron L2 L2^T
=============  ========================  ======================================================

Every other block gets ``diag``: lambda = s (M,), Q = diag(s * s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from fim_linops.fishleg.diag import DiagQ
from fim_linops.fishleg.init import kfac_init_factors
from fim_linops.fishleg.kron import KronDiagQ, KronQ
from fim_linops.fishleg.kron_sum import KronSumQ
from fim_linops.layout import LayerBlock

STRUCTURES = ("kron", "kron_diag", "kron_sum")

#: relative size of the random second term of ``kron_sum`` at initialisation (breaks the symmetry
#: between the two terms; Q is then init_scale * I up to about SUM_SEED_SCALE^4 ~ 1%)
SUM_SEED_SCALE = 0.3


@dataclass(frozen=True)
class BlockSpec:
    """One block of the flat vector and its parameterisation (``kind``: a structure or "diag")."""

    name: str
    module: nn.Module
    start: int
    stop: int
    kind: str
    rows: int = 0
    cols: int = 0
    has_bias: bool = False

    @property
    def numel(self) -> int:
        return self.stop - self.start


def block_spec(block: LayerBlock, structure: str) -> BlockSpec:
    """The parameterisation of one layout block: Kronecker for Linear / Conv2d (groups=1) whose
    weight is trainable, diagonal otherwise."""
    m, names = block.module, block.local_names
    kron_ok = isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    if kron_ok and names in (("weight",), ("weight", "bias")):
        w = block.entry("weight").param  # type: ignore[union-attr]
        has_bias = names == ("weight", "bias")
        rows, cols = w.shape[0], w[0].numel() + int(has_bias)
        return BlockSpec(
            block.module_name, m, block.start, block.stop, structure, rows, cols, has_bias
        )
    return BlockSpec(block.module_name, m, block.start, block.stop, "diag")


def init_lambda(
    spec: BlockSpec,
    scale: float,
    like: Tensor,
    kfac: tuple[Tensor, Tensor] | None = None,
    damping: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Initial lambda of one block: Q = scale * I, or, when ``kfac=(A, G)`` is given (Kronecker
    blocks only), the Kronecker approximation of (G kron A + damping I)^-1 of
    :func:`fim_linops.fishleg.init.kfac_init_factors`. Tensors follow ``like``'s dtype and device."""
    dt, dev = like.dtype, like.device
    if spec.kind == "diag":
        return {"s": torch.full((spec.numel,), scale**0.5, dtype=dt, device=dev)}
    if kfac is not None:
        A, G = kfac[0].to(dtype=dt, device=dev), kfac[1].to(dtype=dt, device=dev)
        R, L = kfac_init_factors(A, G, damping)
        R, L = R.to(dtype=dt, device=dev), L.to(dtype=dt, device=dev)
    else:
        R = torch.eye(spec.rows, dtype=dt, device=dev) * scale**0.25
        L = torch.eye(spec.cols, dtype=dt, device=dev) * scale**0.25
    lam = {"R": R, "L": L}
    if spec.kind == "kron_diag":
        lam["d"] = torch.ones(spec.rows, spec.cols, dtype=dt, device=dev)
    elif spec.kind == "kron_sum":
        # r: typical size of the first term's factors; the second term is small and random
        r_size = (R * R).sum(0).mean().sqrt()
        l_size = (L * L).sum(1).mean().sqrt()
        g_r = torch.randn(spec.rows, spec.rows, generator=generator, dtype=like.dtype)
        g_l = torch.randn(spec.cols, spec.cols, generator=generator, dtype=like.dtype)
        lam = {
            "R1": R,
            "L1": L,
            "R2": SUM_SEED_SCALE * r_size * g_r.to(like.device) / spec.rows**0.5,
            "L2": SUM_SEED_SCALE * l_size * g_l.to(like.device) / spec.cols**0.5,
        }
    return lam


def block_operator(spec: BlockSpec, lam: dict[str, Tensor]) -> LinearOperator:
    """The block's Q as a LinearOperator built from lambda (differentiable in lambda through
    ``_matmul``; pass detached tensors for a fixed operator)."""
    if spec.kind == "diag":
        return DiagQ(lam["s"])
    if spec.kind == "kron":
        return KronQ(lam["R"], lam["L"], has_bias=spec.has_bias)
    if spec.kind == "kron_diag":
        return KronDiagQ(lam["R"], lam["L"], lam["d"], has_bias=spec.has_bias)
    return KronSumQ(lam["R1"], lam["L1"], lam["R2"], lam["L2"], has_bias=spec.has_bias)
