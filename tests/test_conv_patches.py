"""Conv patches (strided copies per kernel offset) equal F.unfold of the module's padded input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fim_linops.engine.rules.conv import patches


def _unfold_reference(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(N, groups, L, J) from F.unfold, the textbook im2col."""
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        k, s, d = (1, *conv.kernel_size), (1, *conv.stride), (1, *conv.dilation)
    else:
        k, s, d = conv.kernel_size, conv.stride, conv.dilation
    u = F.unfold(x, k, dilation=d, stride=s)  # (N, C*kh*kw, L)
    return u.reshape(u.shape[0], conv.groups, -1, u.shape[-1]).transpose(-1, -2)


CASES = [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2),
    nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect", groups=4),
    nn.Conv2d(4, 2, 5, padding=2, padding_mode="circular"),
    nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
    nn.Conv1d(4, 6, 2, dilation=3, padding="same", padding_mode="replicate"),
]


@pytest.mark.parametrize("conv", CASES, ids=[repr(c) for c in CASES])
def test_patches_equal_unfold(conv: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 9, 8) if isinstance(conv, nn.Conv2d) else (3, 4, 11)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    got = patches(conv, x)
    ref = _unfold_reference(conv, x)
    assert got.shape == ref.shape
    assert torch.equal(got, ref)
    # the output positions are those of the module
    assert got.shape[2] == conv(x.float()).shape[2:].numel()


def test_patches_channels_last_input() -> None:
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    assert torch.equal(patches(conv, x), _unfold_reference(conv, x))
