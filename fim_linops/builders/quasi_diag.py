r"""Quasi-diagonal builder: one pass; the diagonal (the diag statistics) and, for the weight and
bias of every layer with a rule (Linear, Conv, the norms), the cross terms
c[b, w] = 1/N sum_{n,k} dW[k, n, b, w] db[k, n, b]. Neuron b owns weight row b (all remaining dims
flattened: Linear inputs, Conv patch entries, one entry for norm layers). Layers without a rule, or
without both a weight and a bias, contribute their diagonal only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fim_linops import statistics
from fim_linops.builders.base import BuildContext, register
from fim_linops.engine import BatchResult, Engine
from fim_linops.engine.rules.linear import LinearRule
from fim_linops.operators.quasi_diag import QuasiDiag, QuasiSpec
from fim_linops.statistics import Sums
from fim_linops.structures import Structure


def quasi_specs(engine: Engine) -> list[tuple[int, QuasiSpec]]:
    """(ruled block index, spec) for every ruled layer with a trainable weight and bias whose
    leading dims agree (one bias per weight row)."""
    out = []
    for i, rb in enumerate(engine.ruled):
        w, b = rb.block.entry("weight"), rb.block.entry("bias")
        if rb.rule.kron_left_is_a:  # W's first dim is not the output (HF Conv1D: (in, out))
            continue
        if w is None or b is None or b.param.ndim != 1 or w.param.ndim == 0:
            continue
        if w.param.shape[0] != b.numel or w.numel % b.numel:
            continue
        out.append(
            (i, QuasiSpec(rb.block.module_name, w.start, b.start, b.numel, w.numel // b.numel))
        )
    return out


def _cross(res: BatchResult, engine: Engine, i: int, spec: QuasiSpec) -> Tensor:
    """sum_{k,n} dW[k, n, b, w] db[k, n, b] for ruled block i, (B, W)."""
    rb = engine.ruled[i]
    calls = res.calls.get(i, [])
    if len(calls) == 1 and isinstance(rb.rule, LinearRule):
        a, g = calls[0]
        if a.ndim == 2:  # one position: dW = g a^T, db = g. k column, n example, o output, i input
            return torch.einsum("kno,ni->oi", g**2, a)
    out = torch.zeros(spec.neurons, spec.width, dtype=res.v.dtype, device=res.v.device)
    w_off = spec.w_start - rb.block.start
    b_off = spec.b_start - rb.block.start
    p_w = spec.neurons * spec.width
    for lo, hi in res.chunks(rb.block.numel):
        gr = res.block_grads(i, lo, hi)  # (k, n, p)
        # columns in slices: the einsum's copies of dw stay small beside gr (counted once)
        starts = res.slices(gr.shape[0], gr.shape[1] * gr.shape[2])
        for k0 in starts:
            part = gr[k0 : k0 + starts.step]
            dw = part[..., w_off : w_off + p_w].reshape(*part.shape[:2], spec.neurons, spec.width)
            db = part[..., b_off : b_off + spec.neurons]
            out += torch.einsum("knbw,knb->bw", dw, db)  # b neuron, w its weight
        del gr
    return out


@register(Structure.QUASI_DIAG)
def build_quasi_diag(ctx: BuildContext) -> QuasiDiag:
    engine = ctx.engine
    pairs = quasi_specs(engine)
    diag: Tensor | None = None
    cross: list[Tensor] = []
    n = 0
    for res in ctx.results():
        d = statistics.diag_sums(engine, [res]).tensors[0]
        parts = [_cross(res, engine, i, spec) for i, spec in pairs]
        if diag is None:
            diag, cross = d, parts
        else:
            diag = diag + d
            cross = [c + p for c, p in zip(cross, parts, strict=True)]
        n += res.count
        del res  # release this batch before the engine makes the next
    assert diag is not None, "fisher() rejects empty data before building"
    sums = Sums(n=n, tensors=[diag, *cross])
    reduce = getattr(ctx, "reduce", None)
    if reduce is not None:
        sums = reduce(sums)
    scale = 1.0 / max(sums.n, 1)
    return QuasiDiag(*[t * scale for t in sums.tensors], specs=tuple(spec for _, spec in pairs))
