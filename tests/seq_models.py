"""Sequence models and float64 per-position references for tests/test_sequences.py.

The references use torch.func (jacrev of the whole (T*C) output of one sequence, hessian of the
per-position loss written with torch.nn.functional) and no fim_linops code but the parameter
layout: F = 1/Z sum_n sum_{t kept} J_nt^T H_nt J_nt, Z = N (positions="sum") or the number of
kept positions (positions="mean").
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from fim_linops.layout import ParamLayout


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        # n: example, h: head, t/s: position, e: head feature
        q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, d))


class TinyGPT(nn.Module):
    """Token + position embeddings, one block (LayerNorm, causal attention, MLP), LM head tied to
    the token embedding. Input (N, T) token ids, output (N, T, V) logits."""

    def __init__(self, vocab: int = 7, d: int = 8, heads: int = 2, context: int = 6):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        h = h + self.attn(self.ln1(h))
        h = h + self.out(torch.tanh(self.fc(self.ln2(h))))
        return self.head(self.ln_f(h))


class SeqRegressor(nn.Module):
    """(N, T, 3) -> (N, T, 2): a per-position MLP with a causal running mean mixing positions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        h = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        return self.b(h)


class HFStyle(nn.Module):
    """A model called with keywords that returns a ModelOutput-like object with ``.logits``."""

    class Out:
        def __init__(self, logits: Tensor):
            self.logits = logits
            self.loss = None

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        return HFStyle.Out(self.inner(input_ids))


def lm_batch(n: int = 3, t: int = 5, vocab: int = 7, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids (N, T) and labels (N, T) with a few -100 (padding at the end of sequence 0,
    a prompt position of sequence 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = torch.randint(0, vocab, (n, t), generator=g)
    labels[0, -2:] = -100
    labels[1, 0] = -100
    return ids, labels


def gpt_and_batch() -> tuple[TinyGPT, Tensor, Tensor]:
    """A TinyGPT (seed 0) and its :func:`lm_batch` (ids, labels)."""
    torch.manual_seed(0)
    model = TinyGPT()
    ids, labels = lm_batch()
    return model, ids, labels


def _ce_hessian(row: Tensor) -> Tensor:
    """(C, C) Hessian of cross-entropy w.r.t. the logits of one position (label-independent)."""

    def loss(f: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(f[None], torch.zeros(1, dtype=torch.long))

    return hessian(loss)(row)


def sequence_jacobian(
    model: nn.Module, x: Any, shift: bool = False, params: Any = None
) -> tuple[Tensor, Tensor]:
    """Float64 outputs f (N, T', C) and Jacobian J (N, T', C, P) in the public parameter order
    (T' = T - 1 when ``shift``: the last output position is dropped)."""
    layout = ParamLayout.from_model(model, params)
    model64 = copy.deepcopy(model).double()
    by_name = dict(model64.named_parameters())
    p = {n: by_name[n].detach() for n in layout.names}
    x = (
        {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
        if isinstance(x, dict)
        else (x.double() if x.is_floating_point() else x)
    )

    def out(pp: dict[str, Tensor], xn: Any) -> Tensor:
        xb = {k: v[None] for k, v in xn.items()} if isinstance(xn, dict) else xn[None]
        f = (
            functional_call(model64, pp, (), xb)
            if isinstance(xb, dict)
            else functional_call(model64, pp, (xb,))
        )
        f = getattr(f, "logits", f)[0]
        f = f[:-1] if shift else f
        return f if f.ndim >= 2 else f[None]  # (T', C); one position for (C,)

    # a loop over the examples, not vmap: Hugging Face's mask code branches on the mask's values
    n_ex = next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]
    rows = [{k: v[i] for k, v in x.items()} if isinstance(x, dict) else x[i] for i in range(n_ex)]
    js = []
    for xn in rows:
        jac = jacrev(out)(p, xn)  # name -> (T', C, *shape)
        js.append(torch.cat([jac[n].reshape(*jac[n].shape[:2], -1) for n in layout.names], -1))
    with torch.no_grad():
        f = torch.stack([out(p, xn) for xn in rows])  # (N, T', C)
    return f, torch.stack(js)


def output_hessians(f: Tensor, kind: str, sigma: float = 1.0) -> Tensor:
    """(N, T, C, C) Hessians of the per-position nll w.r.t. the outputs f (N, T, C)."""
    n, t, c = f.shape
    if kind == "categorical":
        return vmap(_ce_hessian)(f.reshape(-1, c)).reshape(n, t, c, c)
    return torch.eye(c, dtype=f.dtype).expand(n, t, c, c) / sigma**2


def sequence_fisher(
    model: nn.Module,
    x: Any,
    kind: str,
    mask: Tensor | None,
    mean: bool = False,
    shift: bool = False,
    params: Any = None,
    sigma: float = 1.0,
) -> Tensor:
    """Dense float64 F (P, P) of per-position likelihood ``kind`` ("categorical" or "gaussian")
    with kept positions ``mask`` (N, T') (T' = T - 1 when ``shift``)."""
    f, j = sequence_jacobian(model, x, shift, params)
    n, t, c = f.shape
    h = output_hessians(f, kind, sigma)
    m = torch.ones(n, t, dtype=f.dtype) if mask is None else mask.to(f.dtype)
    # n: sequence, t: position, c/d: output, p/q: parameter
    F = torch.einsum("nt,ntcp,ntcd,ntdq->pq", m, j, h, j)
    return F / (m.sum() if mean else n)
