r"""nn.Embedding (dense gradients; not ``scale_grad_by_freq`` or ``max_norm``, which go through
torch.func).

Index convention: k back-propagated column, n example, t position, v vocabulary entry, d embedding
feature. Tokens x[n, t]; per-example gradient dW[k, n, v, d] = sum_t [x[n,t] = v] g[k, n, t, d]
(zero for ``padding_idx``). KFAC: W is (V, D) with the input on the rows, so the block is
A kron G with A = diag(token counts) over N*T rows and G = sum_{k,n,t} g g^T.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from fim_linops.engine.rules.base import KronStats, LayerRule, column_square_sum, register


def _emb(module: nn.Module) -> nn.Embedding:
    """The module as the type this rule is registered for (for the type checker)."""
    return cast("nn.Embedding", module)


class EmbeddingRule(LayerRule):
    types = (nn.Embedding,)
    has_kfac = True
    kron_left_is_a = True

    def supports(self, module: nn.Module) -> bool:
        return not module.scale_grad_by_freq and module.max_norm is None and not module.sparse

    def prepare(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        tokens = inputs[0].reshape(inputs[0].shape[0], -1)
        if _emb(module).padding_idx is not None:
            tokens = tokens.masked_fill(tokens == _emb(module).padding_idx, -1)  # -1: no gradient
        return tokens

    def _onehot(self, module: nn.Module, tokens: Tensor, dtype: torch.dtype) -> Tensor:
        """(N, T, V) one-hot of the tokens, zero rows for padding_idx."""
        valid = tokens >= 0
        oh = torch.nn.functional.one_hot(tokens.clamp_min(0), _emb(module).num_embeddings).to(dtype)
        return oh * valid[..., None].to(dtype)

    def param_grads(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> list[Tensor]:
        return [self._weight_grads(module, a, g)]

    def grads(self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]) -> Tensor:
        """(K, N, V D): the weight's per-example gradients as they are made, no copy."""
        dw = self._weight_grads(module, a, g)
        return dw.view(dw.shape[0], dw.shape[1], -1)

    def _weight_grads(self, module: nn.Module, a: Tensor, g: Tensor) -> Tensor:
        """dW (K, N, V, D), contiguous: each g[k, n, t] added into row (n, x[n, t]) of the flat
        (K, N V, D) result (index_add; a one-hot product would make a permuted result whose
        reshape copies it, and costs V times more)."""
        k, n, d = g.shape[0], g.shape[1], g.shape[-1]
        v = _emb(module).num_embeddings
        tokens = a.reshape(n, -1)  # (n, t); -1: padding_idx, no gradient
        src = g.reshape(k, -1, d)  # (k, n*t, d): row (n, t)
        if _emb(module).padding_idx is not None:
            src = src * (tokens >= 0).reshape(1, -1, 1).to(g.dtype)
        rows = torch.arange(n, device=a.device)[:, None] * v + tokens.clamp_min(0)  # (n, t)
        out = torch.zeros(k, n * v, d, dtype=g.dtype, device=g.device)
        out.index_add_(1, rows.reshape(-1), src)
        return out.view(k, n, v, d)

    def add_diag(
        self, out: Tensor, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> None:
        k, n = g.shape[:2]
        g4 = g.reshape(k, n, -1, g.shape[-1])
        if g4.shape[2] == 1:  # one token per example: no cross terms
            oh = self._onehot(module, a, g.dtype)[:, 0]  # (n, v)
            v, d = oh.shape[1], g4.shape[-1]
            out.view(v, d).add_(oh.T @ column_square_sum(g4[:, :, 0]))  # out[v, d] += sum_n
            return
        super().add_diag(out, module, a, g, names)

    def diag_workspace(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> int:
        return 0 if a.shape[1] == 1 else super().diag_workspace(module, a, g, names)

    def kfac(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...], reduce: bool = False
    ) -> KronStats:
        """Expand convention for every option (token one-hots have no useful average)."""
        counts = self._onehot(module, a, g.dtype).sum((0, 1))  # (v,)
        gf = g.reshape(-1, g.shape[-1])
        return KronStats(
            left_sum=torch.diag(counts)[None],
            right_sum=(gf.T @ gf)[None],
            a_rows=a.numel(),
            left_is_a=True,
        )

    def kron_shape(self, module: nn.Module, names: tuple[str, ...]) -> tuple[int, int, int]:
        return 1, _emb(module).num_embeddings, _emb(module).embedding_dim

    # -- NTK blocks: k, q columns; n, m examples; t, s positions; d feature ---------------------
    def gram_from_ag(self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]) -> bool:
        # per pair of examples: T^2 (K^2 D) from token matches against K^2 V D via gradients
        return a.shape[1] ** 2 < _emb(module).num_embeddings * g.shape[0] ** 2

    def gram(
        self,
        module: nn.Module,
        a1: Tensor,
        g1: Tensor,
        a2: Tensor,
        g2: Tensor,
        names: tuple[str, ...],
    ) -> Tensor:
        r"""sum_{t,s} [x1_t = x2_s] <g1_t, g2_s> (padding tokens, marked -1, match nothing)."""
        k, n = g1.shape[:2]
        q, m = g2.shape[:2]
        g1 = g1.reshape(k, n, -1, g1.shape[-1])
        g2 = g2.reshape(q, m, -1, g2.shape[-1])
        same = (a1[:, :, None, None] == a2[None, None]) & (a1 >= 0)[:, :, None, None]
        return torch.einsum("ntms,kntd,qmsd->knqm", same.to(g1.dtype), g1, g2)


register(EmbeddingRule())
