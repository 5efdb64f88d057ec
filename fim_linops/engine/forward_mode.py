r"""The forward that torch.func transforms or forward-mode AD differentiate.

The engine's torch.func paths (per-example gradients under ``vmap``, Jacobian-vector products,
implicit Fisher products, FishLeg's products) run the model inside :func:`transformed_forward`:

* attention by its math kernel (:mod:`.attention`: the fused kernels have no forward-mode
  derivative and no batching rule);
* Hugging Face attention and mixture-of-experts kernels without a forward-mode derivative
  (flash, flex, grouped_mm) swapped for their eager implementations (:mod:`.hf_kernels`);
* Hugging Face activation checkpointing off (:func:`fim_linops.state.checkpointing_off`);
* :class:`TransformedForward`, a torch function mode that sees every torch call of the forward:
  ``F.embedding`` with a ``padding_idx`` has no derivative at the padding positions in forward
  mode either (:mod:`.padding`), and ``Tensor.requires_grad_`` on a tensor of a torch.func
  transform is inert (the transform tracks the derivatives; torch raises on the call, which
  Hugging Face's ``enable_input_require_grads`` hook makes on the input embeddings of a model
  set up for checkpointed or LoRA training). A functional dropout call that draws a mask
  (``F.dropout`` in training mode, attention with ``dropout_p > 0``) gets a warning
  (:mod:`.dropout`), unless the entry point named active dropout modules already.

Each switch is restored on exit, also when an exception flies. The mode adds one Python call per
torch call of the forward: on the nanoGPT benchmark's product 1,939 against 1,908 ms without it
(medians of 7, within the run's spread).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fim_linops.engine.attention import math_attention
from fim_linops.engine.dropout import active_dropout, functional_dropout, warn_functional_dropout
from fim_linops.engine.hf_kernels import reference_kernels
from fim_linops.engine.padding import padding_rows_constant
from fim_linops.state import checkpointing_off

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


class TransformedForward(TorchFunctionMode):
    """The torch function mode of :func:`transformed_forward` (module docstring). The mode is
    off inside its own handler, so the calls it makes are not seen again."""

    def __init__(self, warn_dropout: bool = True) -> None:
        super().__init__()
        self.warn_dropout = warn_dropout

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.requires_grad_ and args and _is_wrapped(args[0]):
            return args[0]
        if self.warn_dropout and (call := functional_dropout(func, args, kwargs)) is not None:
            self.warn_dropout = False  # once per forward
            warn_functional_dropout(call)
        out = func(*args, **kwargs)
        if func is F.embedding:
            return padding_rows_constant(args, kwargs, out)
        return out


@contextmanager
def transformed_forward(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s forward can be differentiated by torch.func and forward
    mode like its reverse-mode graph (module docstring)."""
    # active dropout modules were named by the entry point already
    mode = TransformedForward(warn_dropout=not active_dropout(model))
    with math_attention(), reference_kernels(model), checkpointing_off(model), mode:
        yield


__all__ = ["TransformedForward", "transformed_forward"]
