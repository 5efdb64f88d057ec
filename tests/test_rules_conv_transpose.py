"""nn.ConvTranspose1d/2d/3d through the patches of the convolution rule (a convolution of the
zero-upsampled input, kernel flipped), against float64 references: the patches equal the
Jacobian of the layer's output w.r.t. its weight (torch.func), diag, block_diag and dense equal
the reference Fisher, the KFAC block equals G kron A formed from those patches and the output
gradients, and KFAC/EKFAC are exact for one example with one output position."""

from __future__ import annotations

import pytest
import torch
from reference import _hessian_sqrt, exact_fisher, output_hessians
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import fim_linops as fl
from fim_linops.engine.rules import rule_for
from fim_linops.engine.rules.conv_transpose import ConvTransposeRule, transposed_patches
from fim_linops.operators import EKFAC, KFAC

pytestmark = pytest.mark.usefixtures("float64_default")

CASES = [  # (layer, input spatial size)
    (lambda: nn.ConvTranspose1d(3, 4, 3), (5,)),
    (lambda: nn.ConvTranspose1d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2), (4,)),
    (lambda: nn.ConvTranspose2d(2, 3, (2, 3), stride=(2, 1), padding=(0, 2), dilation=2), (3, 4)),
    (lambda: nn.ConvTranspose2d(2, 2, 2, stride=2, bias=False), (2, 3)),
    (lambda: nn.ConvTranspose3d(2, 2, 2, stride=(1, 2, 1), padding=1), (2, 2, 3)),
]


def _model(case: int) -> tuple[nn.Sequential, Tensor, Tensor]:
    torch.manual_seed(case)
    make, size = CASES[case]
    model = nn.Sequential(make(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(3, model[0].in_channels, *size)
    model(x)  # materialise the lazy head
    return model, x, torch.randint(0, 3, (3,))


def _patches_by_jacobian(conv: nn.Module, x: Tensor) -> Tensor:
    """U (N, groups, L, J): d y[n, r o, l] / d W[r i, o, j] = U[n, r, l, (i, j)] for every o
    (output o = 0 of each group read), by torch.func.jacrev of the layer in its weight."""
    w = conv.weight.detach()
    jac = jacrev(lambda w_: functional_call(conv, {"weight": w_}, (x,)))(w)
    n, groups, cin = x.shape[0], conv.groups, conv.in_channels // conv.groups
    cout = conv.out_channels // groups
    jac = jac.reshape(n, groups, cout, -1, groups, cin, cout, w[0, 0].numel())
    parts = [jac[:, r, 0, :, r, :, 0].reshape(n, -1, cin * w[0, 0].numel()) for r in range(groups)]
    return torch.stack(parts, dim=1)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_patches_are_the_jacobian_of_the_output_in_the_weight(case: int) -> None:
    model, x, _ = _model(case)
    conv = model[0]
    assert isinstance(rule_for(conv), ConvTransposeRule)
    got = transposed_patches(conv, x, tuple(conv(x).shape[2:]))
    torch.testing.assert_close(got, _patches_by_jacobian(conv, x))


@pytest.mark.parametrize("structure", ["diag", "block_diag", "dense"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_per_example_statistics_match_the_reference(case: int, structure: str) -> None:
    model, x, y = _model(case)
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
    """Per group r, G_r kron A_r over [W_r | b_r] (rows: output channels; columns: (input
    channel, kernel offset), then the bias), permuted into the public order (weight stored
    (in, out / groups, *kernel), then the bias): A_r = 1/(N L) sum [u;1][u;1]^T over the
    Jacobian patches, G_r = 1/N sum_{k,n,l} g g^T over the output gradients of <f_n, S_n[:, k]>."""
    conv = model[0]
    out = {}
    handle = conv.register_forward_hook(lambda m, i, o: out.update(o=o))
    try:
        f = model(x)
    finally:
        handle.remove()
    n, groups = x.shape[0], conv.groups
    s = _hessian_sqrt(output_hessians("categorical", f.detach()))  # (n, c, k)
    u = _patches_by_jacobian(conv, x)  # (n, r, l, j)
    if conv.bias is not None:
        u = torch.cat([u, torch.ones(*u.shape[:3], 1)], -1)
    cout = conv.out_channels // groups
    g_sum = 0
    for k in range(s.shape[-1]):
        (g,) = torch.autograd.grad((f * s[:, :, k]).sum(), out["o"], retain_graph=True)
        g = g.reshape(n, groups, cout, -1)  # (n, r, o, l)
        g_sum = g_sum + torch.einsum("nrol,nrpl->rop", g, g)
    blocks = [
        torch.kron(g_sum[r] / n, torch.einsum("nlj,nli->ji", u[:, r], u[:, r]) / (n * u.shape[2]))
        for r in range(groups)
    ]
    full = torch.block_diag(*blocks)  # index ((r o) cols + c)
    cols = u.shape[-1]
    kernel, cin = conv.weight[0, 0].numel(), conv.in_channels // groups
    order = [  # public: weight (r, i, o, j) row-major, then bias (r, o)
        (r * cout + o) * cols + i * kernel + j
        for r in range(groups)
        for i in range(cin)
        for o in range(cout)
        for j in range(kernel)
    ]
    if conv.bias is not None:
        order += [q * cols + cols - 1 for q in range(groups * cout)]
    idx = torch.tensor(order)
    return full[idx][:, idx]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kfac_factors_are_those_of_the_same_a_and_g(case: int) -> None:
    model, x, y = _model(case)
    F = fl.fisher(model, (x, y), structure="kfac", params=[model[0]])
    assert isinstance(F, KFAC)  # the rule's factors, not an exact block
    torch.testing.assert_close(F.to_dense(), _kfac_from_a_and_g(model, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_kronecker_is_exact_for_one_example_with_one_output_position(structure: str) -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3, padding=1), nn.Flatten())  # 1x1 -> 1x1
    x, y = torch.randn(1, 2, 1, 1), torch.randint(0, 3, (1,))
    F = fl.fisher(model, (x, y), structure=structure)
    assert isinstance(F, KFAC | EKFAC)
    torch.testing.assert_close(F.to_dense(), exact_fisher(model, x, "categorical"))


def test_ekfac_and_kron_sum_build_and_solve_exactly() -> None:
    model, x, y = _model(1)  # groups = 2, stride, output padding
    for structure, kw in (("ekfac", {}), ("kron_sum", {"rank": 2})):
        F = fl.fisher(model, (x, y), structure=structure, **kw).add_diagonal(torch.tensor(0.1))
        b = torch.randn(F.shape[0])
        torch.testing.assert_close(F @ F.solve(b), b, rtol=1e-8, atol=1e-10)
