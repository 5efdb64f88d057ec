r"""``nn.MultiheadAttention``: no layer rule, on purpose.

``nn.MultiheadAttention.forward`` hands its raw parameters (``in_proj_weight`` (3E, E) or
``q/k/v_proj_weight``, ``in_proj_bias``) and ``out_proj.weight`` / ``out_proj.bias`` to
``F.multi_head_attention_forward``, which applies them with ``F.linear`` / ``torch.baddbmm``;
``out_proj`` (a ``NonDynamicallyQuantizableLinear``, a subclass of ``nn.Linear``) is never called.
A forward hook therefore sees neither the projections' inputs a nor the gradients g w.r.t. their
outputs, and the module returns a tuple (output, weights), which the capture does not follow.

Without this entry the Linear rule (found through the class hierarchy) would be tried on
``out_proj``, and the first-batch checks would demote it with a warning on every build. Here
``out_proj`` is declared unruled: it goes to torch.func from the start, silently (its per-example
gradients are exact there), and a Kronecker build gives it an exact block with the reason below.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fim_linops.engine.rules.base import LayerRule, register

#: why ``nn.MultiheadAttention.out_proj`` has no rule (shown by ``describe()``)
MHA_OUT_PROJ = (
    "nn.MultiheadAttention applies out_proj's parameters inside F.multi_head_attention_forward, "
    "never through out_proj's forward"
)


class MHAOutProjRule(LayerRule):
    """``nn.MultiheadAttention.out_proj``: unsupported (torch.func), with its reason."""

    types = (NonDynamicallyQuantizableLinear,)

    def supports(self, module: nn.Module) -> bool:
        return False

    def unsupported_reason(self, module: nn.Module) -> str:
        return MHA_OUT_PROJ


register(MHAOutProjRule())
