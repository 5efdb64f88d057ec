r"""Q g on the parameters' own tensors, from per-block products cached once per auxiliary update.

The parameter step needs Q g at every step, while lambda changes only every few steps. So the
small squared factors are formed once per auxiliary update (:func:`cache_block`),

* ``kron``:      K = R^T R (rows x rows), M = L L^T (cols x cols);
* ``kron_diag``: K, M and d (rows x cols);
* ``kron_sum``:  K1, M1, K2, M2;
* ``diag``:      s * s (block size,),

and each step applies them to the gradient of the layer in its matrix view U = [W | b]
(rows = out, cols = in' + has_bias; :func:`apply_block`): Q g = K U M (``kron``), d * (K (d * U) M)
(``kron_diag``), K1 U M1 + K2 U M2 (``kron_sum``): two matrix products per Kronecker term instead of
the four of R^T (R U) L L^T, and no flattening of the gradient into one vector of size P.

The factors are those of :func:`fim_linops.fishleg.kron.squares` and K U M is the KFAC product of
:func:`fim_linops.operators.kron.kron_matmul`, taken here on the parameters' own matrix view
([W | b] from the parameter tensors, one concatenation) instead of a flat block slice: this is the
per-step hot path, and the flat route would copy the gradient twice more (flatten, then to_mat).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fim_linops.fishleg.kron import squares
from fim_linops.fishleg.parameterisation import BlockSpec


@torch.no_grad()
def cache_block(spec: BlockSpec, lam: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """The block's squared factors from its lambda (detached; see the module docstring)."""
    if spec.kind == "diag":
        return (lam["s"] * lam["s"],)
    if spec.kind == "kron_sum":
        return squares(lam["R1"], lam["L1"]) + squares(lam["R2"], lam["L2"])
    factors = squares(lam["R"], lam["L"])
    return factors + (lam["d"],) if spec.kind == "kron_diag" else factors


def _matrix_view(spec: BlockSpec, tensors: list[Tensor]) -> Tensor:
    """[W | b] of shape (rows, cols) from the block's tensors [W] or [W, b]."""
    w = tensors[0].reshape(spec.rows, -1)
    if not spec.has_bias:
        return w
    return torch.cat([w, tensors[1][:, None]], dim=1)


def _split_view(spec: BlockSpec, z: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Inverse of :func:`_matrix_view`: (rows, cols) -> [W] or [W, b] of the shapes of ``like``."""
    if not spec.has_bias:
        return [z.reshape(like[0].shape)]
    return [z[:, :-1].reshape(like[0].shape), z[:, -1].contiguous()]


def apply_block(
    spec: BlockSpec, factors: tuple[Tensor, ...], tensors: list[Tensor]
) -> list[Tensor]:
    """Q x for one block given as its parameter-shaped tensors (in layout order); same shapes out."""
    if spec.kind == "diag":
        flat = torch.cat([t.reshape(-1) for t in tensors]) * factors[0]
        parts = flat.split([t.numel() for t in tensors])
        return [p.view_as(t) for p, t in zip(parts, tensors, strict=True)]
    u = _matrix_view(spec, tensors)  # (rows, cols)
    if spec.kind == "kron":
        K, M = factors
        z = K @ u @ M
    elif spec.kind == "kron_diag":
        K, M, d = factors
        z = (K @ (u * d) @ M) * d
    else:
        K1, M1, K2, M2 = factors
        z = K1 @ u @ M1 + K2 @ u @ M2
    return _split_view(spec, z, tensors)
