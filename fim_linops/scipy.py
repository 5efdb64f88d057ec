r"""``to_scipy``: any square torch ``LinearOperator`` (or Tensor) as a
``scipy.sparse.linalg.LinearOperator``, so that ``eigsh``, ``cg``, ``minres``, ``gmres``, ``lsqr``
and friends run on a Fisher, a GGN or an NTK without densifying it.

Each product makes one copy each way: the NumPy block ``X`` (P,) or (P, M) becomes a torch tensor
on the operator's device and dtype (``torch.as_tensor`` shares memory, ``.to(device, dtype)``
copies at most once), ``op @ X`` runs under ``torch.no_grad``, and the result comes back through
``.cpu().numpy()`` cast to the requested NumPy dtype. Column blocks go through ``matmat`` in one
operator product, never one column at a time.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla
import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

__all__ = ["to_scipy"]


class TorchScipyOperator(sla.LinearOperator):
    r"""SciPy view of a torch operator ``A`` of shape (N, K).

    ``matvec(x) = A x``, ``matmat(X) = A X`` (one batched product), ``rmatvec(y) = A^H y`` and
    ``rmatmat(Y) = A^H Y`` through ``A.mT`` (real operators: the transpose; a symmetric Fisher is its
    own adjoint). A complex NumPy input on a real operator is applied to its real and imaginary
    parts stacked as columns of one product.
    """

    def __init__(self, op: LinearOperator | Tensor, dtype: np.dtype | type = np.float64) -> None:
        if op.dim() != 2:
            raise ValueError(f"to_scipy: expected a 2-d operator, got shape {tuple(op.shape)}")
        super().__init__(dtype=np.dtype(dtype), shape=tuple(op.shape))
        self.op = op
        self.torch_dtype = op.dtype
        self.torch_device = op.device

    def _to_torch(self, x: np.ndarray) -> Tensor:
        if not x.flags.writeable:  # torch.as_tensor warns on read-only buffers
            x = np.array(x)
        return torch.as_tensor(x).to(self.torch_device, self.torch_dtype)

    def _apply(self, op: LinearOperator | Tensor, x: np.ndarray) -> np.ndarray:
        vector = x.ndim == 1
        xx = x[:, None] if vector else x
        split = np.iscomplexobj(xx) and not self.torch_dtype.is_complex
        if split:
            xx = np.concatenate([xx.real, xx.imag], axis=1)
        with torch.no_grad():
            y = (op @ self._to_torch(np.ascontiguousarray(xx))).cpu().numpy()
        if split:
            m = y.shape[1] // 2
            y = y[:, :m] + 1j * y[:, m:]
        y = y.astype(np.result_type(self.dtype, y.dtype), copy=False)
        return y[:, 0] if vector else y

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply(self.op, x)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._apply(self.op, X)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply(self._adjoint_op(), x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._apply(self._adjoint_op(), X)

    def _adjoint_op(self) -> LinearOperator | Tensor:
        return self.op.mT.conj() if self.torch_dtype.is_complex else self.op.mT


def to_scipy(
    op: LinearOperator | Tensor, dtype: np.dtype | type = np.float64
) -> sla.LinearOperator:
    r"""Wrap ``op`` (N, K) as a ``scipy.sparse.linalg.LinearOperator`` of NumPy dtype ``dtype``.

    Products run on ``op``'s device and dtype; only the result of each product is copied to the
    host. Example::

        >>> import numpy, torch, scipy.sparse.linalg as sla
        >>> from linear_operator.operators import DenseLinearOperator
        >>> A = DenseLinearOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
        >>> vals = sla.eigsh(to_scipy(A), k=2, which="LA", return_eigenvectors=False)
        >>> numpy.sort(vals).round(6).tolist()
        [4.0, 5.0]
    """
    return TorchScipyOperator(op, dtype)
