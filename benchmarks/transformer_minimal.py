r"""Hand-written minimal builds for ``bench_transformer.py``: what the two compared tasks cost
with nothing but the arithmetic they need, in plain torch, for this one model.

* :func:`minimal_kfac`: MC KFAC (one sample, ``expand``) of the Linear layers. Per batch one
  forward with hooks keeping each layer's input a (n, T, d_in) and output, one sampled label per
  token, one backward to the layer outputs only (``autograd.grad`` w.r.t. the outputs: no weight
  gradients), and the factor GEMMs A += [a; 1]^T [a; 1], G += g^T g over the n T tokens.
* :func:`minimal_fvp`: one exact product F v = sum_n J_n^T H_n J_n v. Per batch one forward
  carrying the tangent J v (dual numbers, recording the reverse graph), H (J v) per token for
  softmax cross-entropy, H u = p * u - p (p . u), and one backward through the primal.

No checks, no generality, no statistics objects: a lower bound for the library's time on the
same task, measured in the same run. ``fl.fisher`` adds model checks, layouts and operators.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


def minimal_kfac(
    model: nn.Module, data: list[tuple[Tensor, Tensor]], linears: list[nn.Module]
) -> tuple[dict, dict]:
    """Unnormalised KFAC factors (A with the bias row, G) of ``linears``: name-less dicts."""
    inputs: dict[nn.Module, Tensor] = {}
    outputs: dict[nn.Module, Tensor] = {}

    def hook(m: nn.Module, args: tuple, out: Tensor) -> None:
        inputs[m], outputs[m] = args[0].detach(), out

    handles = [m.register_forward_hook(hook) for m in linears]
    A: dict[nn.Module, Tensor] = {}
    G: dict[nn.Module, Tensor] = {}
    gen = torch.Generator().manual_seed(0)
    try:
        for x, _ in data:
            logits = model(x)  # (n, T, V)
            p = logits.detach().softmax(-1).flatten(0, 1)  # (n T, V)
            s = torch.multinomial(p, 1, generator=gen).squeeze(1)
            r = p.clone()
            r[torch.arange(len(s)), s] -= 1  # d nll / d logits at the sampled labels
            grads = torch.autograd.grad(logits, [outputs[m] for m in linears], r.view_as(logits))
            for m, g in zip(linears, grads, strict=True):
                a = inputs[m].flatten(0, -2)  # (n T, d_in)
                if m.bias is not None:
                    a = torch.cat([a, a.new_ones(len(a), 1)], 1)
                g = g.flatten(0, -2)  # (n T, d_out)
                if m in A:
                    A[m].addmm_(a.T, a)
                    G[m].addmm_(g.T, g)
                else:
                    A[m], G[m] = a.T @ a, g.T @ g
    finally:
        for h in handles:
            h.remove()
        inputs.clear()
        outputs.clear()
    return A, G


def minimal_fvp(model: nn.Module, data: list[tuple[Tensor, Tensor]], v: Tensor) -> Tensor:
    """F v (P,) summed over the tokens and divided by the number of sequences, parameters in
    ``model.parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    tangents = dict(zip(names, torch.split(v, [s.numel() for s in shapes]), strict=True))
    out = torch.zeros_like(v)
    n_seq = 0
    for x, _ in data:
        params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
        with sdpa_kernel(SDPBackend.MATH), fwad.dual_level():
            duals = {n: fwad.make_dual(p, tangents[n].view(p.shape)) for n, p in params.items()}
            primal, jv = fwad.unpack_dual(functional_call(model, duals, (x,)))
        p = primal.detach().softmax(-1)  # (n, T, V)
        u = p * jv - p * (p * jv).sum(-1, keepdim=True)  # H (J v) per token
        grads = torch.autograd.grad(primal, list(params.values()), u)
        out += torch.cat([g.flatten() for g in grads])
        n_seq += x.shape[0]
    return out / n_seq


__all__ = ["minimal_fvp", "minimal_kfac"]
