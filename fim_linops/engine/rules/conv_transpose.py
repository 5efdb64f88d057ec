r"""nn.ConvTranspose1d / 2d / 3d (zero padding, any stride, padding, output padding, dilation,
groups), through the patches of the convolution rule.

A transposed convolution is a convolution of the zero-upsampled input: y[o, l] = sum_{i, j}
W[i, o, j] U[l, i, j] + b[o], where U[l, i, j] is the input x[i] upsampled by the stride
(stride - 1 zeros between entries), padded by d (k - 1) - p before and d (k - 1) - p + op after
(p the padding, op the output padding, d the dilation, k the kernel; a negative pad crops), and
read at the window of output position l with the kernel offset flipped (k - 1 - j). So each
output position is a row of a Linear layer over the patch features (i, j), exactly as for
nn.Conv: the same per-example gradients, diagonal, NTK block and KFAC (Grosse & Martens 2016)
over the matrix view M[r, o, (i, j)] = [W | b] per group r. Only the storage differs: the weight
is (groups * in, out / groups, *kernel), so its public order is not M's row-major order; the
Kronecker view (operators/kron.py, ``KronSpec.kernel``) and :meth:`param_grads` permute it.

Index convention as in rules/conv.py: k back-propagated column, n example, r group, o output
channel within the group, i input channel within the group, j kernel offset (flattened), l output
position (the spatial output dims flattened row-major).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fim_linops.engine.rules.base import LayerRule, register
from fim_linops.engine.rules.conv import ConvRule, windows

ConvT = nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


def _convt(module: nn.Module) -> ConvT:
    return cast("ConvT", module)


def transposed_patches(module: ConvT, x: Tensor, out_size: tuple[int, ...]) -> Tensor:
    """U (N, groups, L, J) with j = (input channel within the group, kernel offset) row-major,
    for an output of spatial size ``out_size`` (which fixes the output padding, also when the
    forward was given ``output_size``)."""
    n, c, *size = x.shape
    stride, kernel, dilation = module.stride, module.kernel_size, module.dilation
    pad = cast("tuple[int, ...]", module.padding)
    if any(s > 1 for s in stride):  # zero-upsample: stride - 1 zeros between entries
        up = x.new_zeros(n, c, *((m - 1) * s + 1 for m, s in zip(size, stride, strict=True)))
        up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] = x
        x = up
    before = [d * (k - 1) - p for d, k, p in zip(dilation, kernel, pad, strict=True)]
    after = [
        o - (m + b - d * (k - 1))  # what makes the conv output o long
        for o, m, b, d, k in zip(out_size, x.shape[2:], before, dilation, kernel, strict=True)
    ]
    widths = [w for b, a in zip(reversed(before), reversed(after), strict=True) for w in (b, a)]
    if any(widths):
        x = F.pad(x, widths)  # negative widths crop
    ones = (1,) * len(kernel)
    return windows(x, kernel, ones, dilation, module.groups, flip=True)


class ConvTransposeRule(ConvRule):
    types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)  # type: ignore[assignment]
    has_kfac = True

    def supports(self, module: nn.Module) -> bool:
        return _convt(module).padding_mode == "zeros"

    def prepare(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        return transposed_patches(_convt(module), inputs[0].detach(), tuple(output.shape[2:]))

    def param_grads(
        self, module: nn.Module, a: Tensor, g: Tensor, names: tuple[str, ...]
    ) -> list[Tensor]:
        g5 = self._g(module, g)  # (k, n, r, o, l)
        k, n, r, o = g5.shape[:4]
        kernel = math.prod(_convt(module).kernel_size)
        parts = []
        for name in names:
            if name == "weight":  # M order (r, o, i, j) -> stored (r, i, o, j)
                dw = torch.einsum("knrol,nrlc->knroc", g5, a)
                dw = dw.reshape(k, n, r, o, -1, kernel).transpose(3, 4)
                parts.append(dw.reshape(k, n, -1))
            else:
                parts.append(g5.sum(-1).reshape(k, n, -1))
        return parts

    # the convolution's fused diagonal writes M's order: the generic one, through param_grads
    add_diag = LayerRule.add_diag
    diag_workspace = LayerRule.diag_workspace

    def kron_shape(self, module: nn.Module, names: tuple[str, ...]) -> tuple[int, int, int]:
        m = _convt(module)
        cols = m.in_channels // m.groups * math.prod(m.kernel_size)
        cols = (cols if "weight" in names else 0) + (1 if "bias" in names else 0)
        return m.groups, m.out_channels // m.groups, cols

    def kron_kernel(self, module: nn.Module) -> int:
        return math.prod(_convt(module).kernel_size)


register(ConvTransposeRule())
