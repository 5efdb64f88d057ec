r"""Brute-force float64 references for the Fisher, built only with torch.func and plain torch.

Nothing here calls the fim_linops engine; only :class:`fim_linops.layout.ParamLayout` (for the
flat parameter order) and the likelihoods' ``nll`` / ``sample`` are used. Every function works on
a float64 deep copy of the model, so the caller's model is never modified.

Shapes: N examples, C outputs, P trainable parameters (``parameters_to_vector`` order over
``model.named_parameters()``, frozen ones skipped, shared ones once), S sampled labels.
Inputs ``x`` follow fim_linops' convention: a tensor is passed as ``model(x)``, a tuple/list as
``model(*x)``, a dict as ``model(**x)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.utils._pytree import tree_map

from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood, get_likelihood

__all__ = [
    "assert_matches",
    "block_diag_of",
    "block_slices",
    "diag_of",
    "empirical_fisher",
    "exact_fisher",
    "kfac_reference",
    "mc_fisher",
    "output_hessians",
    "per_example_jacobians",
]


# -- helpers ------------------------------------------------------------------------------------
def _double(x: Any) -> Any:
    """Floating tensors of a tensor / tuple / dict input to float64; others unchanged."""
    return tree_map(
        lambda t: t.double() if isinstance(t, Tensor) and t.is_floating_point() else t, x
    )


def _call(model: nn.Module, x: Any) -> Tensor:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _setup(
    model: nn.Module, x: Any, params: Iterable | None = None
) -> tuple[nn.Module, Any, list[str], dict[str, Tensor]]:
    """A float64 deep copy of the model, x in float64, the layout's parameter names and the
    copy's parameters by those names (detached)."""
    names = ParamLayout.from_model(model, params).names
    model64 = copy.deepcopy(model).double()
    by_name = dict(model64.named_parameters())
    return model64, _double(x), names, {n: by_name[n].detach() for n in names}


def _flat(tree: dict[str, Tensor], names: list[str], lead: int) -> Tensor:
    """Concatenate ``tree[name]`` of shape (*lead_dims, *param_shape) into (*lead_dims, P)."""
    parts = [tree[n].reshape(*tree[n].shape[:lead], -1) for n in names]
    return torch.cat(parts, dim=-1)


def _fcall(model64: nn.Module, p: dict[str, Tensor], x: Any) -> Tensor:
    """functional_call with the calling convention of :func:`_call`."""
    if isinstance(x, dict):
        return functional_call(model64, p, (), x)
    if isinstance(x, (tuple, list)):
        return functional_call(model64, p, tuple(x))
    return functional_call(model64, p, (x,))


def _per_example_fn(model64: nn.Module, likelihood: Likelihood | None = None):
    """out(p, x_n) -> the output (C,) of one example, run as a batch of one; with a likelihood,
    nll(p, x_n, y_n) -> its scalar negative log-likelihood."""

    def out(p: dict[str, Tensor], xn: Any) -> Tensor:
        return _fcall(model64, p, tree_map(lambda t: t.unsqueeze(0), xn)).reshape(-1)

    if likelihood is None:
        return out

    def nll(p: dict[str, Tensor], xn: Any, yn: Tensor) -> Tensor:
        f = likelihood.check_output(out(p, xn)[None])
        return likelihood.nll(f, yn[None])[0]

    return nll


def _outputs(model64: nn.Module, x64: Any, lik: Likelihood) -> Tensor:
    with torch.no_grad():
        return lik.check_output(_call(model64, x64))


# -- Jacobians and output Hessians --------------------------------------------------------------
def per_example_jacobians(
    model: nn.Module, x: Any, params: Iterable | None = None, loop: bool = False
) -> Tensor:
    """Jacobians (N, C, P) of the model output w.r.t. the trainable parameters (or ``params``),
    one example at a time: vmap over examples of jacrev of functional_call on a batch of one.
    ``loop=True``: plain autograd instead, one backward per example and output, for modules whose
    backward torch.func cannot vmap over examples (nn.LSTM, nn.GRU, nn.RNN, nn.PReLU)."""
    model64, x64, names, p = _setup(model, x, params)
    out = _per_example_fn(model64)
    if loop:
        rows = []
        for i in range(batch_examples(x64)):
            leaves = {k: t.clone().requires_grad_() for k, t in p.items()}
            fn = out(leaves, tree_map(lambda t, i=i: t[i], x64))  # (C,)
            rows.append(
                torch.stack(
                    [_grad_row(fn[c], [leaves[k] for k in names]) for c in range(fn.shape[0])]
                )
            )
        return torch.stack(rows)  # (N, C, P)
    jac = vmap(jacrev(out), in_dims=(None, 0))(p, x64)  # name -> (N, C, *shape)
    return _flat(jac, names, lead=2)


def _grad_row(scalar: Tensor, leaves: list[Tensor]) -> Tensor:
    """The gradient (P,) of one scalar w.r.t. the leaves, flattened in their order."""
    grads = torch.autograd.grad(scalar, leaves, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def batch_examples(x: Any) -> int:
    """The number of examples of a tensor / tuple / dict input (its first tensor's first dim)."""
    first = x if isinstance(x, Tensor) else next(iter(x.values() if isinstance(x, dict) else x))
    return first.shape[0]


def _default_target(lik: Likelihood, f: Tensor) -> Tensor:
    """Any valid label set for ``f`` (the output Hessians of these likelihoods ignore y)."""
    gen = torch.Generator(device=f.device).manual_seed(0)
    return lik.check_target(f, lik.sample(f, 1, generator=gen)[0])


def output_hessians(likelihood: str | Likelihood, f: Tensor, y: Tensor | None = None) -> Tensor:
    """Hessians (N, C, C) of the per-example nll w.r.t. the output f (N, C), by torch.func.hessian
    of the likelihood's ``nll`` (independent of its closed-form ``hessian_sqrt``)."""
    lik = get_likelihood(likelihood)
    f = lik.check_output(f.detach())
    y = _default_target(lik, f) if y is None else lik.check_target(f, y)

    def nll(fn: Tensor, yn: Tensor) -> Tensor:
        return lik.nll(fn[None], yn[None])[0]

    return vmap(hessian(nll))(f, y)


def _hessian_sqrt(h: Tensor) -> Tensor:
    """S (N, C, C) with S S^T = H from the eigendecomposition of H (N, C, C); column k of S is
    sqrt(max(w_k, 0)) v_k."""
    w, v = torch.linalg.eigh(h)
    return v * w.clamp_min(0).sqrt()[:, None, :]


# -- Fishers -----------------------------------------------------------------------------------
def exact_fisher(
    model: nn.Module,
    x: Any,
    likelihood: str | Likelihood,
    params: Iterable | None = None,
    loop: bool = False,
) -> Tensor:
    """Exact Fisher (= GGN) F (P, P) = 1/N sum_n J_n^T H_n J_n, with J from
    :func:`per_example_jacobians` (``loop``: by plain autograd) and H from
    :func:`output_hessians`."""
    lik = get_likelihood(likelihood)
    model64, x64, _, _ = _setup(model, x, params)
    f = _outputs(model64, x64, lik)
    jac = per_example_jacobians(model, x, params, loop=loop)  # (n, c, p)
    h = output_hessians(lik, f)  # (n, c, d)
    # n: example, c/d: output, p/q: parameter
    return torch.einsum("ncp,ncd,ndq->pq", jac, h, jac) / jac.shape[0]


def _per_example_grads(
    model64: nn.Module, x64: Any, y: Tensor, lik: Likelihood, names: list[str], p: dict[str, Tensor]
) -> Tensor:
    """g_n = grad_theta nll(f(x_n), y_n), (N, P), by torch.func.grad per example."""
    with torch.no_grad():
        f = lik.check_output(_call(model64, x64))
    y = lik.check_target(f, y)
    g = vmap(grad(_per_example_fn(model64, lik)), in_dims=(None, 0, 0))(p, x64, y)
    return _flat(g, names, lead=1)


def empirical_fisher(
    model: nn.Module,
    x: Any,
    y: Tensor,
    likelihood: str | Likelihood,
    params: Iterable | None = None,
) -> Tensor:
    """Empirical Fisher (P, P) = 1/N sum_n g_n g_n^T, g_n = grad nll(f(x_n), y_n) (torch.func.grad)."""
    lik = get_likelihood(likelihood)
    model64, x64, names, p = _setup(model, x, params)
    g = _per_example_grads(model64, x64, y, lik, names, p)  # (n, p)
    return g.T @ g / g.shape[0]


def mc_fisher(
    model: nn.Module,
    x: Any,
    likelihood: str | Likelihood,
    n_samples: int,
    generator: torch.Generator | None = None,
    params: Iterable | None = None,
) -> Tensor:
    """Monte-Carlo Fisher (P, P) = 1/(N S) sum_{s,n} g_{sn} g_{sn}^T with y_{sn} ~ p(y | f(x_n))
    drawn by ``likelihood.sample(f, S, generator)`` and g_{sn} = grad nll(f(x_n), y_{sn}).

    By the chain rule g_{sn} = J_n^T r_{sn} with r_{sn} = d nll / d f (torch.func.grad of ``nll``),
    so this sums J_n^T (sum_s r r^T) J_n: the same number, without S backward passes per example.
    """
    lik = get_likelihood(likelihood)
    model64, x64, _, _ = _setup(model, x, params)
    f = _outputs(model64, x64, lik)  # (n, c)
    n, c = f.shape
    ys = lik.sample(f, n_samples, generator=generator)  # (s, n, ...)
    f_rep = f.expand(n_samples, n, c).reshape(n_samples * n, c)  # row s * N + n
    ys = lik.check_target(f_rep, ys.reshape(n_samples * n, *ys.shape[2:]))

    def nll(fn: Tensor, yn: Tensor) -> Tensor:
        return lik.nll(fn[None], yn[None])[0]

    r = vmap(grad(nll))(f_rep, ys).reshape(n_samples, n, c)  # d nll / d f per (s, n)
    m = torch.einsum("snc,snd->ncd", r, r)  # sum over s of r r^T
    jac = per_example_jacobians(model, x, params)  # (n, c, p)
    return torch.einsum("ncp,ncd,ndq->pq", jac, m, jac) / (jac.shape[0] * n_samples)


# -- structures applied to a dense F -----------------------------------------------------------
def block_slices(model: nn.Module, params: Iterable | None = None) -> list[tuple[int, int]]:
    """(start, stop) of each layer block (the trainable parameters owned by one module)."""
    return [(b.start, b.stop) for b in ParamLayout.from_model(model, params).blocks]


def block_diag_of(F: Tensor, slices: list[tuple[int, int]]) -> Tensor:
    """F (P, P) with every entry outside the diagonal blocks ``slices`` set to zero."""
    out = torch.zeros_like(F)
    for start, stop in slices:
        out[start:stop, start:stop] = F[start:stop, start:stop]
    return out


def assert_matches(op: Any, ref: Tensor, model: nn.Module, structure: str) -> None:
    """A structure's operator against the dense reference F: its diagonal for "diag", F's
    diagonal blocks for "block_diag", F itself otherwise (rtol 1e-10: float64)."""
    if structure == "diag":
        torch.testing.assert_close(op.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)
    elif structure == "block_diag":
        want = block_diag_of(ref, block_slices(model))
        torch.testing.assert_close(op.to_dense(), want, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-12)


def diag_of(F: Tensor) -> Tensor:
    """The diagonal part of F (P, P), as a dense (P, P) matrix (use ``F.diagonal()`` for the vector)."""
    return torch.diag(torch.diagonal(F))


# -- KFAC --------------------------------------------------------------------------------------
def kfac_reference(
    model: nn.Module, x: Any, likelihood: str | Likelihood, approx: str = "expand"
) -> Tensor:
    r"""Dense KFAC (P, P) of a model whose parameterised layers are all nn.Linear (each called once).

    Per layer with input a (N, *T, in) and output gradients g: the right factor
    A = 1/(N T) sum_{n,t} [a;1][a;1]^T (the 1 only when the bias is trainable, a only when the weight
    is), the left factor G = 1/N sum_{n,k,t} g g^T, where g is the gradient w.r.t. the layer output
    of <f_n, S_n[:, k]> and S_n S_n^T = H_n (S from the eigendecomposition of the reference output
    Hessian). ``approx="reduce"``: a averaged and g summed over t first (then T = 1).
    The block G kron A over row-major [W | b] is permuted into the public order (W row-major
    (out, in), then b (out)); off-block entries are zero. a and g come from forward hooks and
    torch.autograd.grad, one column k at a time.
    """
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    lik = get_likelihood(likelihood)
    layout = ParamLayout.from_model(model)
    model64, x64, _, _ = _setup(model, x)
    modules64 = dict(model64.named_modules())
    for block in layout.blocks:
        if not isinstance(block.module, nn.Linear):
            raise ValueError(
                f"kfac_reference supports nn.Linear only; {block.module_name!r} is "
                f"{type(block.module).__name__}"
            )
    captured: dict[str, list[tuple[Tensor, Tensor]]] = {b.module_name: [] for b in layout.blocks}

    def hook(name: str):
        def fn(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            captured[name].append((inputs[0].detach(), output))

        return fn

    handles = [
        modules64[b.module_name].register_forward_hook(hook(b.module_name)) for b in layout.blocks
    ]
    try:
        f = lik.check_output(_call(model64, x64))
    finally:
        for h in handles:
            h.remove()
    for name, calls in captured.items():
        if len(calls) != 1:
            raise ValueError(
                f"kfac_reference: layer {name!r} was called {len(calls)} times, expected 1"
            )
    n = f.shape[0]
    s = _hessian_sqrt(output_hessians(lik, f.detach()))  # (n, c, k)
    outs = [captured[b.module_name][0][1] for b in layout.blocks]
    g_sq: list[Tensor] = [torch.zeros(()) for _ in layout.blocks]
    for k in range(s.shape[-1]):
        gs = torch.autograd.grad((f * s[:, :, k]).sum(), outs, retain_graph=True)
        for i, g in enumerate(gs):
            g = g.reshape(n, -1, g.shape[-1])  # (n, t, o)
            if approx == "reduce":
                g = g.sum(1, keepdim=True)
            g = g.reshape(-1, g.shape[-1])
            g_sq[i] = g_sq[i] + g.T @ g
    P = layout.numel
    F = torch.zeros(P, P, dtype=torch.float64)
    for i, block in enumerate(layout.blocks):
        a = captured[block.module_name][0][0]
        a = a.reshape(n, -1, a.shape[-1])  # (n, t, i)
        if approx == "reduce":
            a = a.mean(1, keepdim=True)
        a = a.reshape(-1, a.shape[-1])
        names = block.local_names
        cols = []
        if "weight" in names:
            cols.append(a)
        if "bias" in names:
            cols.append(torch.ones(a.shape[0], 1, dtype=a.dtype))
        ab = torch.cat(cols, dim=1)
        A = ab.T @ ab / ab.shape[0]
        G = g_sq[i] / n
        K = torch.kron(G, A)  # row-major [W | b]: index o * (in + 1) + j
        n_in, n_cols = (a.shape[1] if "weight" in names else 0), ab.shape[1]
        n_out = G.shape[0]
        perm = []  # public position -> row-major [W | b] position
        for e in block.entries:
            if e.local_name == "weight":
                perm += [o * n_cols + j for o in range(n_out) for j in range(n_in)]
            else:
                perm += [o * n_cols + n_cols - 1 for o in range(n_out)]
        perm_t = torch.tensor(perm)
        F[block.start : block.stop, block.start : block.stop] = K[perm_t][:, perm_t]
    return F
