r"""nn.Linear, with inputs of any leading dims (N, *T, in).

Index convention: k back-propagated column, n example, t position (the flattened leading dims
after the batch dim, T = 1 when there are none), i input feature, o output feature.

Per-example gradient: dW[k, n] = sum_t g[k, n, t] a[n, t]^T, db[k, n] = sum_t g[k, n, t].
KFAC (Martens & Grosse 2015; the "expand" convention of Eschenhagen et al. 2023 for T > 1):
A = sum_{n,t} [a;1][a;1]^T over N*T rows, G = sum_{k,n,t} g g^T; block (G/N) kron (A/(N T)) over
row-major [W | b]. "reduce": a_n = mean_t a_{n,t}, g_{k,n} = sum_t g_{k,n,t}, then as for T = 1.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from fim_linops.engine.rules.base import KronStats, LayerRule, column_square_sum, register


def _lin(module: nn.Module) -> nn.Linear:
    """The module as the type this rule is registered for (for the type checker)."""
    return cast("nn.Linear", module)


def _as_3d(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """a (N, *T, i) -> (N, T, i); g (K, N, *T, o) -> (K, N, T, o)."""
    n = a.shape[0]
    return a.reshape(n, -1, a.shape[-1]), g.reshape(g.shape[0], n, -1, g.shape[-1])


def with_ones(a: Tensor, weight: bool, bias: bool) -> Tensor:
    """The rows of the right factor: [a, 1] (both), a (weight only) or 1 (bias only)."""
    parts = []
    if weight:
        parts.append(a)
    if bias:
        parts.append(torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def gram_with_ones(a: Tensor, weight: bool, bias: bool) -> Tensor:
    r"""R^T R for the rows R = with_ones(a) without forming R: a (..., rows, i) ->
    (..., c, c) with c = i (weight) + 1 (bias); the blocks are a^T a, a^T 1 and rows."""
    if not bias:
        return a.transpose(-1, -2) @ a
    rows = a.shape[-2]
    if not weight:
        return torch.full((*a.shape[:-2], 1, 1), float(rows), dtype=a.dtype, device=a.device)
    i = a.shape[-1]
    out = torch.empty(*a.shape[:-2], i + 1, i + 1, dtype=a.dtype, device=a.device)
    torch.matmul(a.transpose(-1, -2), a, out=out[..., :i, :i])  # sum_rows a a^T
    total = a.sum(-2)  # (..., i): sum_rows a
    out[..., :i, i] = total
    out[..., i, :i] = total
    out[..., i, i] = rows
    return out


def add_gram_with_ones(out: Tensor, a: Tensor, weight: bool, bias: bool) -> None:
    """``out += gram_with_ones(a, weight, bias)`` in place, for a (rows, i) or (groups, rows, i)
    and out (..., c, c): a^T a added into the top-left block, the column sums of a into the last
    row and column, the row count into the corner."""
    rows = a.shape[-2]
    if not weight:
        out += rows
        return
    i = a.shape[-1]
    top = out[..., :i, :i] if bias else out
    top += a.transpose(-1, -2) @ a  # product, then add (rules/base.py, ACCUMULATE)
    if bias:
        total = a.sum(-2)  # (..., i)
        out[..., :i, i] += total
        out[..., i, :i] += total
        out[..., i, i] += rows


def linear_param_grads(
    a: Tensor, g: Tensor, names: tuple[str, ...], weight_eq: str
) -> list[Tensor]:
    """Per-example gradients of a linear map's ``names``: the weight by ``weight_eq`` over
    a (n, t, i) and g (k, n, t, o) ("knto,nti->knoi" for nn.Linear's (out, in) weight,
    "knto,nti->knio" for a weight stored (in, out)), the bias sum_t g."""
    a3, g3 = _as_3d(a, g)
    return [torch.einsum(weight_eq, g3, a3) if n == "weight" else g3.sum(2) for n in names]


def linear_factor_sums(
    a: Tensor, g: Tensor, names: tuple[str, ...], reduce: bool
) -> tuple[Tensor, Tensor, int]:
    """(A (1, c, c), G (1, o, o), rows of A) of a linear map, "expand" or ``reduce`` (module
    docstring); which side each factor sits on is the rule's."""
    a3, g3 = _as_3d(a, g)
    if reduce:  # KFAC-reduce: a averaged, g summed over the positions t of each example
        a3, g3 = a3.mean(1, keepdim=True), g3.sum(2, keepdim=True)
    af = a3.reshape(-1, a3.shape[-1])  # (n*t, i)
    gf = g3.reshape(-1, g3.shape[-1])  # (k*n*t, o)
    return (
        gram_with_ones(af, "weight" in names, "bias" in names)[None],
        (gf.T @ gf)[None],
        af.shape[0],
    )


def add_linear_factor_sums(
    a_sum: Tensor, g_sum: Tensor, a: Tensor, g: Tensor, names: tuple[str, ...], with_a: bool
) -> int:
    """``linear_factor_sums`` ("expand") added in place into a_sum (c, c) (only ``with_a``) and
    g_sum (o, o); returns the rows added to A."""
    af = a.reshape(-1, a.shape[-1])  # (n*t, i)
    gf = g.reshape(-1, g.shape[-1])  # (k*n*t, o)
    g_sum += gf.T @ gf  # product, then add (rules/base.py, ACCUMULATE)
    if not with_a:
        return 0
    add_gram_with_ones(a_sum, af, "weight" in names, "bias" in names)
    return af.shape[0]


class LinearRule(LayerRule):
    types = (nn.Linear,)
    has_kfac = True

    def param_grads(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> list[Tensor]:
        return linear_param_grads(a, g, names, "knto,nti->knoi")  # dW (k, n, o, i)

    def add_diag(
        self, out: Tensor, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> None:
        if a.ndim != 2:
            a3, g3 = _as_3d(a, g)
            if a3.shape[1] != 1:  # sums over positions come before the square: per-example grads
                super().add_diag(out, module, a, g, names)
                return
            a, g = a3[:, 0], g3[:, :, 0]  # (n, i), (k, n, o)
        g2 = column_square_sum(g)  # (n, o): sum over k of g^2
        lo = 0
        for name in names:
            if name == "weight":  # out[o, i] += sum_n g2[n, o] a[n, i]^2, straight into the total
                o, i = g2.shape[1], a.shape[1]
                # fused into the total: for this (o, i) output over a short inner dimension
                # (the examples) 1.5x the float32 error of product-then-add (9e-8 against 6e-8
                # on the digits MLP) for a 12% faster build; rules/base.py, ACCUMULATE
                out[lo : lo + o * i].view(o, i).addmm_(g2.T, a.square())
                lo += o * i
            else:
                out[lo : lo + g2.shape[1]] += g2.sum(0)
                lo += g2.shape[1]

    def diag_workspace(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> int:
        one_position = a.ndim == 2 or a[0].numel() == a.shape[-1]
        return 0 if one_position else super().diag_workspace(module, a, g, names)

    def kfac(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...], reduce: bool = False
    ) -> KronStats:
        a_sum, g_sum, rows = linear_factor_sums(a, g, names, reduce)
        return KronStats(left_sum=g_sum, right_sum=a_sum, a_rows=rows)

    def accumulate_kfac(
        self,
        acc: KronStats,
        module: nn.Module,
        a: Tensor,
        g: Tensor,
        names: tuple[str, ...],
        with_a: bool = True,
    ) -> None:
        acc.a_rows += add_linear_factor_sums(acc.right_sum[0], acc.left_sum[0], a, g, names, with_a)

    def kron_shape(self, module: nn.Module, names: tuple[str, ...]) -> tuple[int, int, int]:
        cols = (_lin(module).in_features if "weight" in names else 0) + (
            1 if "bias" in names else 0
        )
        return 1, _lin(module).out_features, cols

    # -- NTK blocks: q, k columns; n, m examples; t, s positions; i input; o output -------------
    @staticmethod
    def _inner_a(a1: Tensor, a2: Tensor, names: tuple[str, ...]) -> Tensor:
        """<[a1;1], [a2;1]> over what the block holds: (N1, T1, N2, T2); the bias adds 1."""
        inner = (
            torch.einsum("nti,msi->ntms", a1, a2)
            if "weight" in names
            else a1.new_zeros(a1.shape[0], a1.shape[1], a2.shape[0], a2.shape[1])
        )
        return inner + 1 if "bias" in names else inner

    def gram_from_ag(self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]) -> bool:
        # per pair of examples: T^2 (i + K^2 o) from (a, g) against K^2 o i through gradients
        a3, g3 = _as_3d(a, g)
        t, i, o, k = a3.shape[1], a3.shape[2], g3.shape[3], g3.shape[0]
        return t == 1 or t * t * (i + k * k * o) < k * k * o * i

    def gram(
        self,
        module: nn.Module,
        a1: Tensor,
        g1: Tensor,
        a2: Tensor,
        g2: Tensor,
        names: tuple[str, ...],
    ) -> Tensor:
        r"""sum_{t,s} <[a1_t;1], [a2_s;1]> <g1_t, g2_s>: for T = 1 the Hadamard product
        (A1 A2^T + 1) * (G1 G2^T), one GEMM over the outputs, never the gradients."""
        a1, g1 = _as_3d(a1, g1)
        a2, g2 = _as_3d(a2, g2)
        inner = self._inner_a(a1, a2, names)  # (n, t, m, s)
        if a1.shape[1] == 1 and a2.shape[1] == 1:
            k, n, q, m = g1.shape[0], g1.shape[1], g2.shape[0], g2.shape[1]
            gg = (g1.reshape(k * n, -1) @ g2.reshape(q * m, -1).T).reshape(k, n, q, m)
            return gg * inner[:, 0, :, 0][None, :, None, :]
        return torch.einsum("ntms,knto,qmso->knqm", inner, g1, g2)

    def gram_diag(self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]) -> Tensor:
        a3, g3 = _as_3d(a, g)
        if a3.shape[1] != 1:
            return super().gram_diag(module, a, g, names)
        sq_a = (a3[:, 0] ** 2).sum(-1) if "weight" in names else torch.zeros_like(a3[:, 0, 0])
        sq_a = sq_a + 1 if "bias" in names else sq_a  # (n,)
        return (g3[:, :, 0] ** 2).sum(-1) * sq_a  # (k, n)


register(LinearRule())
