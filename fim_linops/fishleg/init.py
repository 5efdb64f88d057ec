r"""KFAC estimate of the Fisher blocks of Linear/Conv2d layers on one batch, to initialise Q.

For a layer with inputs a_n (bias entry 1 appended) and output gradients g_nk = J_layer^T S_n[:, k]
for the columns k of the output-Hessian square root S_n (S_n S_n^T = H_n), the exact Fisher block
over row-major [W | b] is approximated by G kron A with

    A = 1/N sum_n a_n a_n^T            (cols x cols),
    G = 1/N sum_n sum_k g_nk g_nk^T    (rows x rows).

Conv2d (groups = 1): a runs over the unfolded patches (in*kh*kw entries) and the positions t,
A = 1/(N T) sum_{n,t} a a^T, G = 1/N sum_{n,t,k} g g^T (KFC, Grosse & Martens 2016).

The factor sums are the engine's (one Kronecker code): each layer's rule
(:mod:`fim_linops.engine.rules`) turns the captured input and output gradient into them
(``prepare`` for the patches, ``add_kfac`` for the "expand" sums). The capture stays here, apart
from the engine's pass (:func:`fim_linops.frame.run_build`), because FishLeg's auxiliary batches
may be inputs alone (the engine needs (x, y) batches), the init runs on the model itself in its own
mode and dtype, at the start of training, and only over the layers that get a Kronecker Q. Inputs
are captured with forward hooks (removed on exit, also on error); output gradients come from
``torch.autograd.grad`` w.r.t. the captured layer outputs, so ``.grad`` of the parameters is
untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fim_linops.engine.rules import KronStats, LayerRule, rule_for
from fim_linops.fishleg.fvp import run_model
from fim_linops.likelihoods import Likelihood
from fim_linops.operators.base import sym_eigh


def _kron_rule(name: str, m: nn.Module) -> LayerRule:
    rule = rule_for(m)
    if rule is None or not rule.has_kfac:
        raise ValueError(
            f"FishLeg: layer {name!r} ({type(m).__name__}) has no Kronecker factors; use "
            "init='scale' or a structure without Kronecker blocks for it"
        )
    return rule


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
    rules = {name: _kron_rule(name, m) for name, (m, _) in layers.items()}
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(m: nn.Module, args: tuple, out: Tensor) -> None:
            inputs[name] = rules[name].prepare(m, args, out)  # the input (patches), detached
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
    sums: dict[str, KronStats | None] = {k: None for k in names}
    for k in range(s.shape[-1]):  # K columns of S (C at most): one backward each
        gs = torch.autograd.grad(
            f,
            [outputs[k2] for k2 in names],
            grad_outputs=s[..., k],
            retain_graph=True,
            allow_unused=True,
        )
        for name, g in zip(names, gs, strict=True):
            if g is not None:  # the rules take K = 1 column: (1, N, *output)
                m, has_bias = layers[name]
                first = sums[name] is None  # A from the inputs once, G from every column
                sums[name] = rules[name].add_kfac(
                    sums[name], m, inputs[name], g[None], _names(has_bias), with_a=first
                )
    factors = {}
    for name in names:
        m, has_bias = layers[name]
        st = sums[name]
        if st is None:  # the layer does not reach the output: no curvature; A alone
            a, dummy = inputs[name], outputs[name].detach().new_zeros(1, *outputs[name].shape)
            st = rules[name].add_kfac(None, m, a, dummy, _names(has_bias))
            factors[name] = (st.right_sum[0] / st.a_rows, st.left_sum[0])
        else:
            factors[name] = (st.right_sum[0] / st.a_rows, st.left_sum[0] / n)
    return factors


def _names(has_bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if has_bias else ("weight",)


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
