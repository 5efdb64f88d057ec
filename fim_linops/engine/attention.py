r"""Attention by its math formula inside the engine's transformed forwards.

``torch.nn.functional.scaled_dot_product_attention`` (what Hugging Face runs by default, and
``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` inside) dispatches to fused kernels
(``_scaled_dot_product_flash_attention_for_cpu``, the CUDA flash / memory-efficient / cuDNN
kernels) that have no forward-mode derivative and no ``vmap`` batching rule, and
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode take a C++ "fast path"
(``aten::_native_multi_head_attention``, ``aten::_transformer_encoder_layer_fwd``) that has none
either. So Jacobian-vector products (implicit Fisher products, ``fl.jacobian``, the NTK, the
Laplace predictives, FishLeg) raise ``NotImplementedError: Trying to use forward AD with ...``, and
per-example gradients under ``vmap`` fall back to a loop over the examples.

:func:`math_attention` runs the forward with the math backend of scaled_dot_product_attention
(softmax(Q K^T / sqrt(d) + mask) V written with matmul and softmax, whose forward- and
reverse-mode derivatives and batching rules all exist) and with the MHA fast path off, which
gives the same function up to rounding. Both switches are global state in torch; they are
restored to what they were on exit, also when an exception flies.

Cost: the math kernel stores the (N, heads, T, T) attention probabilities for the backward, where
the fused kernels keep only O(N heads T) statistics; the torch.func paths that need it hold at
most one batch of them at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextmanager
def math_attention() -> Iterator[None]:
    """Within the block, ``scaled_dot_product_attention`` runs its math backend and the
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` fast path is off; the previous backend
    selection and fast-path flag are restored on exit, exception or not."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


__all__ = ["math_attention"]
