"""Exact scalar summaries of a Fisher operator: trace, Frobenius norm, quadratic form."""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fim_linops.operators.base import FisherOperator


def trace(op: LinearOperator) -> Tensor:
    """tr(F), exact from the structure (no probes)."""
    if isinstance(op, FisherOperator):
        return op.trace_exact()
    return op.diagonal().sum()


def frobenius_norm(op: LinearOperator) -> Tensor:
    """||F||_F, exact from the structure (factor norms for KFAC, per-example Gram for implicit)."""
    if isinstance(op, FisherOperator):
        return op.frobenius_sq_exact().clamp_min(0).sqrt()
    return torch.linalg.matrix_norm(op.to_dense())


def quad(op: LinearOperator, v: Tensor) -> Tensor:
    """v^T F v (NNGeometry's vTMv); for a batch V (P, M) the M quadratic forms."""
    if v.shape[0] != op.shape[-1]:
        raise ValueError(
            f"quad: vector of length {v.shape[0]} for an operator of size {op.shape[-1]}"
        )
    if v.ndim == 1 and hasattr(op, "quad_exact"):
        return op.quad_exact(v)
    return (v * (op @ v)).sum(0)
