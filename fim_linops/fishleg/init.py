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


def inverse_sqrt(m: Tensor, damping: Tensor | float) -> Tensor:
    """(m + damping I)^{-1/2} for a symmetric PSD m, through its eigendecomposition (float64)."""
    work = m.double()
    evals, evecs = torch.linalg.eigh((work + work.mT) / 2)
    scale = (evals.clamp_min(0) + damping).rsqrt()
    return ((evecs * scale) @ evecs.mT).to(m.dtype)


def kfac_init_factors(A: Tensor, G: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    r"""R, L with R^T R kron L L^T = (G + d_G I)^-1 kron (A + d_A I)^-1, the damping split by the
    trace heuristic pi = sqrt((tr A / cols) / (tr G / rows)): d_A = pi sqrt(gamma), d_G = sqrt(gamma) / pi."""
    ta = A.diagonal().mean().clamp_min(1e-12)
    tg = G.diagonal().mean().clamp_min(1e-12)
    pi = (ta / tg).sqrt()
    root = damping**0.5
    return inverse_sqrt(G, root / pi), inverse_sqrt(A, root * pi)
