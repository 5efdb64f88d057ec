r"""The capture forward of ``nn.MultiheadAttention``: its function, with its projections as calls
that the engine can capture (engine/capture.py).

``nn.MultiheadAttention.forward`` hands ``in_proj_weight`` (3E, E) (or ``q/k/v_proj_weight``),
``in_proj_bias`` and ``out_proj``'s parameters to ``F.multi_head_attention_forward``, which
applies them inside; ``out_proj`` is never called and no hook sees an input or an output
gradient. While the engine captures, the module's forward is replaced (an instance attribute,
removed afterwards) by :func:`mha_capture_forward`, which computes the same function:

1. the inputs, examples first ((N, L, E): a ``batch_first=False`` input (L, N, E) is transposed,
   keeping ``query is key is value``);
2. the in-projections, recorded as calls of the module when its rule is in use (``record`` not
   None), with the parts stacked along dim 2 (index convention of rules/mha.py):
   self-attention (``query is key is value``): one call, input x, output (N, L, 3, E) =
   x W^T + b unflattened (one GEMM, as in torch); otherwise one call for the queries (output
   (N, T, 1, E)) and one for the keys and values (inputs key, value; output (N, S, 2, E));
3. attention: ``F.multi_head_attention_forward`` on the projected q, k, v with identity projection
   weights and no biases (``bias_k``, ``bias_v``, ``add_zero_attn``, dropout, masks,
   ``need_weights``, ``is_causal`` exactly as the module passes them), so the attention core is
   torch's own; x I = x exactly in floating point. Cost: four (E, E) products per call more than
   the module's forward, in the Fisher's passes only;
4. ``out_proj`` called as a module on the (N, T, E) attention output, so its nn.Linear rule
   (found through the class hierarchy: ``NonDynamicallyQuantizableLinear``) captures it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the engine's ``record(module, inputs, output) -> output to use`` (engine/capture.py, Record)
Record = Any


def _examples_first(query: Tensor, key: Tensor, value: Tensor, how) -> tuple:
    """``how`` applied to the three inputs, keeping ``query is key`` and ``key is value``."""
    if key is value:
        if query is key:
            x = how(query)
            return x, x, x
        k = how(key)
        return how(query), k, k
    return how(query), how(key), how(value)


def _project(m: nn.MultiheadAttention, record: Record, q_in: Tensor, k_in: Tensor, v_in: Tensor):
    """q, k, v (N, L, E) = the inputs' projections; recorded as the module's calls when
    ``record`` is given (packed in_proj_weight only: the rule's condition)."""
    e = m.embed_dim
    b = m.in_proj_bias
    bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight
        wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    if record is None:
        return F.linear(q_in, wq, bq), F.linear(k_in, wk, bk), F.linear(v_in, wv, bv)
    if q_in is k_in and k_in is v_in:  # self-attention: one GEMM, parts (q, k, v)
        z = record(m, (q_in,), F.linear(q_in, m.in_proj_weight, b).unflatten(-1, (3, e)))
        return z[:, :, 0], z[:, :, 1], z[:, :, 2]
    zq = record(m, (q_in,), F.linear(q_in, wq, bq).unsqueeze(2))  # part (q,)
    if k_in is v_in:  # parts (k, v) from one input: one GEMM
        bkv = b[e:] if b is not None else None
        zkv = record(m, (k_in,), F.linear(k_in, m.in_proj_weight[e:], bkv).unflatten(-1, (2, e)))
    else:
        kv = torch.stack([F.linear(k_in, wk, bk), F.linear(v_in, wv, bv)], dim=2)
        zkv = record(m, (k_in, v_in), kv)
    return zq[:, :, 0], zkv[:, :, 0], zkv[:, :, 1]


def mha_capture_forward(
    m: nn.MultiheadAttention,
    record: Record,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` (its non-fast path) with hookable projections."""
    batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    if not batched:  # (L, E): one sequence, as a batch of one
        query, key, value = _examples_first(query, key, value, lambda t: t.unsqueeze(0))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not m.batch_first:  # (L, N, E) -> (N, L, E)
        query, key, value = _examples_first(query, key, value, lambda t: t.transpose(0, 1))
    q, k, v = _project(m, record, query, key, value)
    eye = torch.eye(m.embed_dim, dtype=q.dtype, device=q.device)
    out, weights = F.multi_head_attention_forward(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        m.embed_dim,
        m.num_heads,
        None,
        None,
        m.bias_k,
        m.bias_v,
        m.add_zero_attn,
        m.dropout,
        eye,
        None,
        training=m.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    out = m.out_proj(out.transpose(0, 1))  # (N, T, E): examples first, for its rule
    if not batched:
        return out[0], None if weights is None else weights[0]
    return (out if m.batch_first else out.transpose(0, 1)), weights
