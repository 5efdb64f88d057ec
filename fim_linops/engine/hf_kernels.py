r"""Hugging Face kernels that forward mode cannot differentiate, swapped for their reference
implementations inside the engine's transformed forwards.

Hugging Face models pick their attention and mixture-of-experts kernels at each forward from
their config: ``config._attn_implementation`` ("eager", "sdpa", "flash_attention_2",
"flex_attention", ...) and ``config._experts_implementation`` ("eager", "grouped_mm", ...).
Several have no forward-mode derivative, so implicit Fisher products, ``fl.jacobian``, the NTK
and FishLeg's products would raise inside them: torch's ``NotImplementedError: Trying to use
forward AD with _grouped_mm`` (the default experts of Mixtral, Qwen2-MoE, OLMoE), the
flash-attention and flex-attention kernels likewise. The "eager" implementations compute the
same functions with plain torch ops (a loop over the experts, softmax(Q K^T / sqrt(d) + mask) V),
whose derivatives all exist; "sdpa" is kept (:mod:`.attention` runs its math kernel).

:func:`reference_kernels` selects them on every config of the model that names another, and puts
the old names back on exit, also when an exception flies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

#: config field -> the implementations kept as they are
_KEEP = {
    "_attn_implementation": (None, "eager", "sdpa"),
    "_experts_implementation": (None, "eager"),
}


@contextmanager
def reference_kernels(model: nn.Module) -> Iterator[None]:
    """Within the block, the Hugging Face attention and experts of ``model`` run an
    implementation that forward mode can differentiate (module docstring); other models are
    untouched."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    changed = [
        (c, field, getattr(c, field))
        for c in configs.values()
        for field, keep in _KEEP.items()
        if getattr(c, field, None) not in keep
    ]
    for c, field, _ in changed:
        setattr(c, field, "eager")
    try:
        yield
    finally:
        for c, field, name in changed:
            setattr(c, field, name)


__all__ = ["reference_kernels"]
