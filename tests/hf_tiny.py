"""Shared pieces of the Hugging Face tests: tiny config sizes, a padded batch, a tolerance."""

from __future__ import annotations

import torch

VOCAB = 40
#: the sizes every tiny decoder config takes (kv heads, head dims and the rest per family)
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=32,
)


def padded_batch() -> dict[str, torch.Tensor]:
    """Two sequences of 5 tokens, the last two of sequence 0 padding (id 0, label -100); the
    other ids avoid 0 and 1 (the configs' padding ids)."""
    ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """a (any float dtype) equals the reference b to rtol, entries small next to b's largest to
    rtol times it."""
    torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=rtol * float(b.abs().max()))
