r"""KFAC estimate of the Fisher blocks of Linear/Conv2d layers on one batch, to initialise Q.

For a layer with inputs a_n (bias entry 1 appended) and output gradients g_nk = J_layer^T S_n[:, k]
for the columns k of the output-Hessian square root S_n (S_n S_n^T = H_n), the exact Fisher block
over row-major [W | b] is approximated by G kron A with

    A = 1/N sum_n a_n a_n^T            (cols x cols),
    G = 1/N sum_n sum_k g_nk g_nk^T    (rows x rows).

Conv2d (groups = 1): a runs over the unfolded patches (in*kh*kw entries) and the positions t,
A = 1/(N T) sum_{n,t} a a^T, G = 1/N sum_{n,t,k} g g^T (KFC, Grosse & Martens 2016).

Inputs are captured with forward hooks (removed on exit, also on error); output gradients come from
``torch.autograd.grad`` w.r.t. the captured layer outputs, so ``.grad`` of the parameters is untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import unfold

from fim_linops.fishleg.fvp import run_model
from fim_linops.likelihoods import Likelihood
from fim_linops.operators.base import sym_eigh


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))  # type: ignore[return-value]
    return m.padding  # type: ignore[return-value]


def _inputs(m: nn.Module, x: Tensor, has_bias: bool) -> Tensor:
    """Layer input -> (N*T, cols): one row per example (and position), bias entry appended."""
    if isinstance(m, nn.Conv2d):
        # n: example, e: patch entry (in*kh*kw), t: position
        a = unfold(x, m.kernel_size, dilation=m.dilation, padding=_conv_padding(m), stride=m.stride)
        a = a.transpose(1, 2).reshape(-1, a.shape[1])  # (N*T, e)
    else:
        a = x.reshape(-1, x.shape[-1])  # (N*T, in): leading dims are examples/positions
    if has_bias:
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
    return a


def _outputs(g: Tensor, m: nn.Module) -> Tensor:
    """Output gradient -> (N*T, out)."""
    if isinstance(m, nn.Conv2d):
        return g.movedim(1, -1).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def _out_features(m: nn.Module) -> int:
    """Output features of a Linear / output channels of a Conv2d layer."""
    return int(m.out_channels if isinstance(m, nn.Conv2d) else m.weight.shape[0])  # type: ignore[index]


def kfac_factors(
    model: nn.Module,
    likelihood: Likelihood,
    x: Any,
    layers: Mapping[str, tuple[nn.Module, bool]],
) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (A, G) for the given Linear/Conv2d layers (name -> (module, has_bias)) on batch x
    (a tensor, a tuple of positional inputs or a dict of keyword inputs). The model's parameters,
    ``.grad`` and hooks are left as found.
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(m: nn.Module, args: tuple, out: Tensor) -> None:
            inputs[name] = args[0].detach()
            outputs[name] = out

        return fn

    try:
        for name, (m, _) in layers.items():
            handles.append(m.register_forward_hook(hook(name)))
        with torch.enable_grad():
            f = likelihood.check_output(run_model(model, x))
    finally:
        for h in handles:
            h.remove()
    n = f.shape[0]
    s = likelihood.hessian_sqrt(f.detach())  # (N, C, K)
    names = [k for k in layers if k in outputs]
    sums_g: dict[str, Tensor | None] = {k: None for k in names}
    for k in range(s.shape[-1]):  # K columns of S (C at most): one backward each
        gs = torch.autograd.grad(
            f,
            [outputs[k2] for k2 in names],
            grad_outputs=s[..., k],
            retain_graph=True,
            allow_unused=True,
        )
        for name, g in zip(names, gs, strict=True):
            if g is not None:
                go = _outputs(g, layers[name][0])  # (N*T, out)
                gg = go.mT @ go  # o, p: output features
                prev = sums_g[name]
                sums_g[name] = gg if prev is None else prev + gg
    factors = {}
    for name in names:
        m, has_bias = layers[name]
        a = _inputs(m, inputs[name], has_bias)  # (N*T, cols)
        A = a.mT @ a / a.shape[0]
        sg = sums_g[name]
        if sg is None:  # the layer does not reach the output: no curvature
            G = A.new_zeros(_out_features(m), _out_features(m))
        else:
            G = sg / n
        factors[name] = (A, G)
    return factors


def _sym_sqrt(evecs: Tensor, values: Tensor) -> Tensor:
    """U diag(sqrt(values)) U^T: the symmetric square root of U diag(values) U^T."""
    return (evecs * values.sqrt()) @ evecs.mT


def kfac_init_factors(
    A: Tensor, G: Tensor, damping: float, iters: int = 50
) -> tuple[Tensor, Tensor]:
    r"""R, L (symmetric) of the Kronecker Q = R^T R kron L L^T that ``init="kfac"`` starts at.

    With A = U_A diag(a) U_A^T, G = U_G diag(g) U_G^T (float64 eigendecompositions by
    :func:`fim_linops.operators.base.sym_eigh`), the damped KFAC block in the eigenbasis
    U_G kron U_A is diagonal, F_gamma = diag(w), w_oc = g_o a_c + gamma (o: output row, c: input
    column). Q is sought in the same basis, R^T R = U_G diag(r) U_G^T, L L^T = U_A diag(l) U_A^T,
    so Q = diag(r_o l_c), and (r, l) minimise FishLeg's own expected auxiliary loss for isotropic
    probes among the Q that never exceed the damped KFAC inverse,

        E_u A = 1/2 tr(Q F_gamma Q) - tr(Q) = 1/2 sum_oc w_oc (r_o l_c - 1 / w_oc)^2 + const,
        subject to r_o l_c w_oc <= 1 for every (o, c)   (Q <= F_gamma^-1 in that basis),

    by alternating exact minimisations, each a one-dimensional quadratic clipped to its bound:
    r_o = min(sum_c l_c / sum_c w_oc l_c^2, min_c 1 / (w_oc l_c)), then the same for l_c (each
    lowers the loss and stays feasible; ``iters`` rounds from the feasible l = 1 / max_o w_oc).
    Where (G kron A + gamma I)^-1 is itself a Kronecker product (gamma = 0, or A or G a multiple of
    I: e.g. any nn.Linear under a Gaussian likelihood, G = I) 1 / w has rank one, the bound is met
    with equality and Q = (F_KFAC + gamma I)^-1 exactly (after one round). Elsewhere the bound keeps
    Q from overshooting the stiff directions: the unbounded fit weighs each direction's relative
    error by 1 / w_oc, so it trades an excess of up to 2-9x the inverse curvature in the stiffest
    directions for accuracy in the flat ones (measured on the auto-encoder benchmark), and a
    parameter step lr Q g then overshoots along them. (The factored Tikhonov damping of KFAC,
    (G + d_G I)^-1 kron (A + d_A I)^-1 with d_A d_G = gamma, is also below F_gamma^-1 but not exact
    in the Kronecker case.) Zero curvature with gamma = 0 is floored at 1e-12 of the largest w.
    The scale is split so that r and l have the same mean.
    """
    a, ua = sym_eigh(A.double())  # eigenvalues clamped at 0
    g, ug = sym_eigh(G.double())
    w = g[:, None] * a[None, :] + damping  # (rows, cols)
    w = w.clamp_min(1e-12 * float(w.max().clamp_min(1e-300)))
    inv_w = 1.0 / w
    l = inv_w.min(0).values  # (cols,): feasible with r = 1
    r = torch.ones_like(g)
    for _ in range(iters):
        r = torch.minimum(l.sum() / (w @ (l * l)), (inv_w / l[None, :]).min(1).values)
        l = torch.minimum(r.sum() / (w.mT @ (r * r)), (inv_w / r[:, None]).min(0).values)
    s = (l.mean() / r.mean()).sqrt()
    R, L = _sym_sqrt(ug, r * s), _sym_sqrt(ua, l / s)
    return R.to(G.dtype), L.to(A.dtype)
