r"""``nn.MultiheadAttention``'s input projection: three Kronecker blocks, one per part (q, k, v).

The module's packed ``in_proj_weight`` (3E, E) and ``in_proj_bias`` (3E) hold the query, key and
value projections as row blocks j = 0, 1, 2: part j maps its own input (the query for q, the key
for k, the value for v) to its own output. Its calls come from the module's capture forward
(rules/mha_forward.py), with the parts of one call stacked along dim 2:

* self-attention (``query is key is value``): one call, parts (q, k, v), P = 3;
* otherwise one call for (q,), P = 1, and one for (k, v), P = 2.

Index convention: k back-propagated column, n example, l position (T queries or S keys), p part
of the call (its row block j = p, or p + 1 in the (k, v) call, P = 2), i input feature, o output feature (both E).
a (N, L, P, E): the part's input at each position; g (K, N, L, P, E): the gradient w.r.t. the
part's projected output.

Per-example gradient of row block j: dW_j[k, n] = sum_l g[k, n, l, p] a[n, l, p]^T,
db_j[k, n] = sum_l g[k, n, l, p]. KFAC: one Kronecker block per part, over the row-major
[W_j | b_j] (E, E + 1), i.e. groups = 3 of the matrix view (3, E, E + 1) of [in_proj_weight |
in_proj_bias]: G_j = 1/N sum_{k,n,l} g g^T and A_j = 1/N sum_n 1/L sum_l [a;1][a;1]^T (each
part's own inputs and positions: T for q, S for k and v; "expand", which for a fixed length is
the nn.Linear convention; "reduce" averages a and sums g over positions first). The blocks between
parts are zero: in self-attention the three A_j are the same matrix, and G is block-diagonal
over q, k, v (a Linear(E, 3E) would keep the 3E x 3E G). KFAC is exact for a part with one row
per example (one query position for q, one key position for k and v), as for nn.Linear.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from fim_linops.engine.rules.base import CAPTURE_FORWARDS, KronStats, LayerRule, register
from fim_linops.engine.rules.linear import gram_with_ones
from fim_linops.engine.rules.mha_forward import mha_capture_forward

W, B = "in_proj_weight", "in_proj_bias"

#: why an nn.MultiheadAttention with kdim or vdim != embed_dim has no Kronecker rule
SEPARATE_WEIGHTS = (
    "kdim or vdim differs from embed_dim: q/k/v_proj_weight and the shared in_proj_bias are not "
    "one [W | b] matrix (no Kronecker rule for them; out_proj keeps its own)"
)


def _first_block(parts: int) -> int:
    """The row block of a call's first part: 1 for the (k, v) call, else 0 (q first)."""
    return 1 if parts == 2 else 0


def _mha(module: nn.Module) -> nn.MultiheadAttention:
    return cast("nn.MultiheadAttention", module)


class MHAInProjRule(LayerRule):
    types = (nn.MultiheadAttention,)
    has_kfac = True
    param_names = (W, B)

    def supports(self, module: nn.Module) -> bool:
        return bool(_mha(module)._qkv_same_embed_dim)

    def unsupported_reason(self, module: nn.Module) -> str:
        return "" if self.supports(module) else SEPARATE_WEIGHTS

    def prepare(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        """a (N, L, P, E): the call's input(s) per part (a view, not a copy, for one input)."""
        parts = output.shape[2]
        if len(inputs) == 1:
            return inputs[0].detach().unsqueeze(2).expand(-1, -1, parts, -1)
        return torch.stack([x.detach() for x in inputs], dim=2)

    def param_grads(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> list[Tensor]:
        k, n, _, parts, e = g.shape
        off = _first_block(parts)
        out = []
        for name in names:
            if name == W:
                dw = torch.einsum("knlpo,nlpi->knpoi", g, a)
                full = dw if parts == 3 else g.new_zeros(k, n, 3, e, a.shape[-1])
                if parts != 3:
                    full[:, :, off : off + parts] = dw
                out.append(full.reshape(k, n, 3 * e, a.shape[-1]))
            else:
                db = g.sum(2)  # (k, n, p, o)
                full = db if parts == 3 else g.new_zeros(k, n, 3, e)
                if parts != 3:
                    full[:, :, off : off + parts] = db
                out.append(full.reshape(k, n, 3 * e))
        return out

    def kfac(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...], reduce: bool = False
    ) -> KronStats:
        n, length, parts, e = a.shape
        shared = parts > 1 and a.stride(2) == 0  # one input for all parts: one A
        if reduce:  # KFAC-reduce: a averaged, g summed over the positions l of each example
            a, g, length = a.mean(1, keepdim=True), g.sum(2, keepdim=True), 1
        off = _first_block(parts)
        stats = self.zero_kron_stats(module, names, g.dtype, g.device)
        right = None
        for p in range(parts):  # the call's parts, not examples
            gp = g[:, :, :, p].reshape(-1, e)  # (k*n*l, o)
            stats.left_sum[off + p] = gp.T @ gp
            if right is None or not shared:
                ap = a[:, :, p].reshape(-1, a.shape[-1])  # (n*l, i)
                right = gram_with_ones(ap, W in names, B in names) / length  # mean over l
            stats.right_sum[off + p] = right
        # A_j is a mean over each example's positions, summed over examples: the count is the
        # examples, once per forward (the call holding the queries)
        stats.a_rows = n if off == 0 else 0
        return stats

    def kron_shape(self, module: nn.Module, names: tuple[str, ...]) -> tuple[int, int, int]:
        e = _mha(module).embed_dim
        return 3, e, (e if W in names else 0) + (1 if B in names else 0)

    def kron_flags(self, names: tuple[str, ...]) -> tuple[bool, bool]:
        return W in names, B in names


register(MHAInProjRule())
CAPTURE_FORWARDS[nn.MultiheadAttention] = mha_capture_forward
