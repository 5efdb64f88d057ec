"""nn.Conv3d through the convolution rule (patches over three spatial dims), against float64
references: patches equal an independent im2col (a Conv3d with one-hot kernels), diag,
block_diag and dense equal the reference Fisher, the KFAC factors equal those formed from the
same a and g, and KFAC/EKFAC are exact for one example with one output position."""

from __future__ import annotations

import pytest
import torch
from reference import _hessian_sqrt, exact_fisher, output_hessians
from torch import Tensor, nn

import fim_linops as fl
from fim_linops.engine.rules import rule_for
from fim_linops.engine.rules.conv import ConvRule, patches
from fim_linops.operators import EKFAC, KFAC

pytestmark = pytest.mark.usefixtures("float64_default")


def _im2col_by_conv(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """(N, groups, L, J) from a Conv3d whose kernels are one-hot (one output channel per patch
    entry j = (input channel within the group, kd, kh, kw)), padded as ``conv`` pads."""
    cin = conv.in_channels // conv.groups
    kernel = conv.kernel_size
    j = cin * kernel[0] * kernel[1] * kernel[2]
    eye = torch.eye(j).reshape(j, cin, *kernel).repeat(conv.groups, 1, 1, 1, 1)
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = nn.functional.pad(x, pad, mode=mode) if any(pad) else x
    u = nn.functional.conv3d(
        xp, eye, stride=conv.stride, dilation=conv.dilation, groups=conv.groups
    )  # (N, groups * J, D', H', W')
    n = x.shape[0]
    return u.reshape(n, conv.groups, j, -1).transpose(-1, -2)


CASES = [
    lambda: nn.Conv3d(2, 3, 2),
    lambda: nn.Conv3d(2, 4, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)),
    lambda: nn.Conv3d(4, 2, 3, padding="same", padding_mode="reflect", groups=2),
    lambda: nn.Conv3d(2, 2, 2, padding=1, padding_mode="circular", bias=False),
]


def _model(case: int) -> nn.Sequential:
    torch.manual_seed(case)
    conv = CASES[case]()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))


def _data(model: nn.Sequential, n: int = 3) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, model[0].in_channels, 3, 4, 3)
    model(x)  # materialise the lazy head
    return x, torch.randint(0, 3, (n,))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_conv3d_patches_equal_an_independent_im2col(case: int) -> None:
    model = _model(case)
    x, _ = _data(model)
    assert isinstance(rule_for(model[0]), ConvRule)
    torch.testing.assert_close(patches(model[0], x), _im2col_by_conv(model[0], x))


@pytest.mark.parametrize("structure", ["diag", "block_diag", "dense"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_conv3d_per_example_statistics_match_the_reference(case: int, structure: str) -> None:
    model = _model(case)
    x, y = _data(model)
    F = fl.fisher(model, (x, y), structure=structure).to_dense()
    ref = exact_fisher(model, x, "categorical")
    if structure == "diag":
        ref = torch.diag(ref.diagonal())
    elif structure == "block_diag":
        cut = sum(p.numel() for p in model[0].parameters())
        ref[:cut, cut:] = 0
        ref[cut:, :cut] = 0
    torch.testing.assert_close(F, ref, rtol=1e-10, atol=1e-12)


def _kfac_from_a_and_g(model: nn.Sequential, x: Tensor) -> Tensor:
    """The conv block G kron A in the public order, from its input patches (the independent
    im2col) and the gradients w.r.t. its output of <f_n, S_n[:, k]>, S_n S_n^T = H_n:
    A = 1/(N L) sum_{n,l} [u;1][u;1]^T, G = 1/N sum_{k,n,l} g g^T (groups = 1)."""
    conv = model[0]
    out = {}
    handle = conv.register_forward_hook(lambda m, i, o: out.update(o=o))
    try:
        f = model(x)
    finally:
        handle.remove()
    n = x.shape[0]
    s = _hessian_sqrt(output_hessians("categorical", f.detach()))  # (n, c, k)
    u = _im2col_by_conv(conv, x)[:, 0]  # (n, l, j)
    if conv.bias is not None:
        u = torch.cat([u, torch.ones(*u.shape[:2], 1)], -1)
    a = torch.einsum("nlj,nli->ji", u, u) / (n * u.shape[1])
    g_sum = 0
    for k in range(s.shape[-1]):
        (g,) = torch.autograd.grad((f * s[:, :, k]).sum(), out["o"], retain_graph=True)
        g = g.reshape(n, g.shape[1], -1)  # (n, o, l)
        g_sum = g_sum + torch.einsum("nol,npl->op", g, g)
    block = torch.kron(g_sum / n, a)  # over row-major [W | b]: (o, j + 1)
    o, cols = conv.out_channels, a.shape[0]
    j = cols - (conv.bias is not None)
    idx = torch.arange(o * cols).reshape(o, cols)
    order = torch.cat([idx[:, :j].reshape(-1), idx[:, j:].reshape(-1)])  # W, then b
    return block[order[:, None], order[None, :]]


@pytest.mark.parametrize("case", [0, 1, 3])  # groups = 1
def test_conv3d_kfac_factors_are_those_of_the_same_a_and_g(case: int) -> None:
    model = _model(case)
    x, y = _data(model)
    F = fl.fisher(model, (x, y), structure="kfac", params=[model[0]])
    assert isinstance(F, KFAC)  # the rule's factors, not an exact block
    torch.testing.assert_close(F.to_dense(), _kfac_from_a_and_g(model, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_conv3d_kronecker_is_exact_for_one_example_with_one_output_position(
    structure: str,
) -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv3d(2, 3, (2, 3, 2)), nn.Flatten())  # the kernel covers the input
    x, y = torch.randn(1, 2, 2, 3, 2), torch.randint(0, 3, (1,))
    F = fl.fisher(model, (x, y), structure=structure)
    assert isinstance(F, KFAC | EKFAC)
    torch.testing.assert_close(F.to_dense(), exact_fisher(model, x, "categorical"))
