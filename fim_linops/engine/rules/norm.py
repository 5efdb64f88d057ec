r"""LayerNorm, GroupNorm and BatchNorm (eval mode only: in training mode the batch statistics couple
the examples and there is no per-example Fisher).

Index convention: k column, n example, c the affine feature (LayerNorm: normalized_shape flattened;
GroupNorm/BatchNorm: channel), s the remaining positions.

With x_hat the normalised input (what the affine weight multiplies), the per-example gradients are
dweight[k, n, c] = sum_s g[k, n, c, s] x_hat[n, c, s], dbias[k, n, c] = sum_s g[k, n, c, s].
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from fim_linops.engine.rules.base import LayerRule, register


class _AffineNormRule(LayerRule):
    def x_hat(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _to_ncs(self, module: nn.Module, t: Tensor) -> Tensor:
        """(..., N, *) -> (..., N, c, s)."""
        raise NotImplementedError

    def prepare(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        with torch.no_grad():
            return self.x_hat(module, inputs[0].detach())

    def param_grads(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> list[Tensor]:
        k, n = g.shape[:2]
        gs = self._to_ncs(module, g.reshape(k * n, *g.shape[2:])).reshape(
            k, n, *self._cs(module, a)
        )
        xs = self._to_ncs(module, a)
        parts = []
        for name in names:
            if name == "weight":
                parts.append(torch.einsum("kncs,ncs->knc", gs, xs))
            else:
                parts.append(gs.sum(-1))
        return parts

    def _cs(self, module: nn.Module, a: Tensor) -> tuple[int, int]:
        xs = self._to_ncs(module, a)
        return xs.shape[1], xs.shape[2]


class LayerNormRule(_AffineNormRule):
    """LayerNorm over the trailing ``normalized_shape``; affine parameters of that shape.
    Inputs (N, *T, *normalized_shape): c runs over normalized_shape, s over T."""

    types = (nn.LayerNorm,)

    def x_hat(self, module: nn.Module, x: Tensor) -> Tensor:
        module = cast(nn.LayerNorm, module)
        dims = tuple(range(-len(module.normalized_shape), 0))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps)

    def _to_ncs(self, module: nn.Module, t: Tensor) -> Tensor:
        module = cast(nn.LayerNorm, module)
        c = int(torch.Size(module.normalized_shape).numel())
        return t.reshape(t.shape[0], -1, c).transpose(1, 2)


class GroupNormRule(_AffineNormRule):
    """GroupNorm on (N, C, *spatial); affine parameters per channel."""

    types = (nn.GroupNorm,)

    def x_hat(self, module: nn.Module, x: Tensor) -> Tensor:
        module = cast(nn.GroupNorm, module)
        n = x.shape[0]
        xg = x.reshape(n, module.num_groups, -1)
        mean = xg.mean(-1, keepdim=True)
        var = xg.var(-1, unbiased=False, keepdim=True)
        return ((xg - mean) / torch.sqrt(var + module.eps)).reshape_as(x)

    def _to_ncs(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1)


class BatchNormRule(_AffineNormRule):
    """BatchNorm1d/2d/3d in eval mode (running statistics); affine parameters per channel."""

    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def supports(self, module: nn.Module) -> bool:
        module = cast(nn.modules.batchnorm._BatchNorm, module)
        return not module.training and module.track_running_stats

    def x_hat(self, module: nn.Module, x: Tensor) -> Tensor:
        module = cast(nn.modules.batchnorm._BatchNorm, module)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        assert module.running_mean is not None and module.running_var is not None  # supports()
        mean = module.running_mean.reshape(shape).to(x.dtype)
        var = module.running_var.reshape(shape).to(x.dtype)
        return (x - mean) / torch.sqrt(var + module.eps)

    def _to_ncs(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1)


register(LayerNormRule())
register(GroupNormRule())
register(BatchNormRule())
