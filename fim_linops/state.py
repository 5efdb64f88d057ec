"""Leave the model exactly as found: parameters, buffers, .grad, train/eval mode, hooks."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _renormed_weights(model: nn.Module) -> list[torch.Tensor]:
    """Parameters that the model's own forward rewrites in place: the weights of Embedding and
    EmbeddingBag with ``max_norm`` (renormalised rows on every lookup)."""
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    ]


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore train/eval flags and ``.grad`` of every parameter on exit, also on exceptions;
    and the values of the buffers and of the parameters that the model's forward rewrites in
    place (``max_norm`` embeddings), where their version counter moved. (The engine never calls
    ``.backward()`` and removes its own hooks; this is the safety net.) Hugging Face activation
    checkpointing is off within (:func:`checkpointing_off`)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    tensors = [*model.parameters(), *model.buffers()]
    versions = [t._version for t in tensors]
    saved = {id(t): t.detach().clone() for t in [*model.buffers(), *_renormed_weights(model)]}
    try:
        with torch.enable_grad(), checkpointing_off(model):
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, g in grads:
            p.grad = g
        changed = [t for t, v in zip(tensors, versions, strict=True) if t._version != v]
        with torch.no_grad():
            for t in changed:
                if id(t) in saved:
                    t.copy_(saved[id(t)])
        lost = {id(t) for t in changed if id(t) not in saved}
        if lost:
            named = [*model.named_parameters(), *model.named_buffers()]
            names = [n for n, t in named if id(t) in lost]
            warnings.warn(
                f"the model's forward rewrote {', '.join(map(repr, names))} in place while the "
                "Fisher was computed; fim_linops could not restore the old values",
                RuntimeWarning,
                stacklevel=3,
            )


@contextmanager
def checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Hugging Face activation checkpointing (``model.gradient_checkpointing_enable()``) off
    within the block, back on at exit, also on exceptions.

    Checkpointing changes what the forward keeps for the backward, not the function: the layers
    recompute their forward inside the backward (``use_reentrant=True``: invisible to the
    autograd graph, so no per-example gradient can pass; ``False``: its saved-tensor hooks do not
    run under torch.func transforms). Hugging Face layers checkpoint only while their
    ``gradient_checkpointing`` flag is set (and in training mode), so the flag of every module
    that has it set is cleared here. A model in the middle of checkpointed training then gives
    its Fisher without a change; its activations for one batch are held as without checkpointing.
    """
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        setattr(m, "gradient_checkpointing", False)  # noqa: B010  (not a declared attribute)
    try:
        yield
    finally:
        for m in flagged:
            setattr(m, "gradient_checkpointing", True)  # noqa: B010
