r"""Exact Fisher (generalised Gauss-Newton) vector products on one batch, for FishLeg.

For a batch x of N examples with model outputs f_n = f(theta; x_n) in R^C and output Hessians
H_n = d^2 nll / d f^2 (the Fisher of the likelihood in output space),

    F w = 1/N sum_n J_n^T H_n J_n w,        J_n = d f_n / d theta  (C x P),

computed without any Jacobian: one forward pass in forward mode gives the outputs f and the
Jacobian-vector product J w (``torch.func.jvp`` through ``torch.func.functional_call``); the
output-space product H (J w) is closed form (``likelihood.hessian_matmul``); one reverse pass from
the same forward gives J^T (H J w) (the vector-Jacobian product). Cost: about three forward passes.

``fisher="sampled"`` replaces H_n by the rank-one r_n r_n^T with r_n = d nll(f_n, y_n) / d f_n at
labels y_n ~ p(y | f_n): the unbiased Monte-Carlo Fisher with one sample, F w ~ 1/N sum_n g_n (g_n^T w),
g_n = J_n^T r_n the gradient at the sampled label. (The reference FishLeg library's "rank-1"
estimator multiplies by (g^T w) w instead of (g^T w) g, which is not a Fisher product; we do not.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from fim_linops.engine import FisherType
from fim_linops.engine.forward_mode import transformed_forward
from fim_linops.likelihoods import Likelihood
from fim_linops.options import BuildOptions
from fim_linops.positions import Positions, flat_mask, mapping_mask


def call_model(model: nn.Module, params: Mapping[str, Tensor], x: Any) -> Tensor:
    """model(x) with the tensors in ``params`` standing in for the parameters of those names;
    ``x`` is a tensor, a tuple/list of positional inputs, or a dict of keyword inputs; within
    :func:`fim_linops.engine.forward_mode.transformed_forward` (math attention, padding rows, no
    checkpointing): this forward is differentiated in forward mode."""
    with transformed_forward(model):
        if isinstance(x, dict):
            return functional_call(model, dict(params), (), x)
        if isinstance(x, (tuple, list)):
            return functional_call(model, dict(params), tuple(x))
        return functional_call(model, dict(params), (x,))


def run_model(model: nn.Module, x: Any) -> Tensor:
    """model(x), model(*x) or model(**x) for a tensor, a tuple/list or a dict of inputs."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


#: FishLeg's names of the Fisher types of its products -> BuildOptions' Fisher types
FISHER_TYPES = {"exact": "exact", "sampled": "mc"}


def fishleg_options(
    likelihood: str | Likelihood, fisher: str = "exact", generator: torch.Generator | None = None
) -> BuildOptions:
    """FishLeg's Fisher arguments checked once into :class:`BuildOptions`: the likelihood, the
    Fisher type (``"exact"``, or ``"sampled"``: one sampled label per example, the options'
    ``"mc"`` with ``mc_samples=1``) and the generator of the sampled labels."""
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be 'exact' or 'sampled', got {fisher!r}")
    return BuildOptions.of(likelihood, FISHER_TYPES[fisher], generator=generator)


def fisher_vector_product(
    model: nn.Module,
    likelihood: Likelihood,
    x: Any,
    w: Mapping[str, Tensor],
    fisher: str = "exact",
    generator: torch.Generator | None = None,
    y: Tensor | None = None,
) -> dict[str, Tensor]:
    r"""F w = 1/N sum_n J_n^T H_n J_n w on the batch x, per parameter.

    Per-position outputs (N, *T, C): H_n is block diagonal over the kept positions (labels ``y``
    equal to ``ignore_index`` or NaN targets drop theirs; without ``y``, a mapping batch's
    ``attention_mask``), and ``positions="mean"`` divides by the batch's kept positions instead
    of N.

    Args:
        model: the network; its current parameters are the linearisation point. Parameters not
            named in ``w`` are held fixed. The model's train/eval mode is used as is.
        likelihood: an :class:`fim_linops.likelihoods.Likelihood` (gives H v, or samples).
        x: one batch of inputs (tensor, tuple or dict), N examples.
        w: name -> direction tensor of that parameter's shape (the vector w, per parameter).
        fisher: ``"exact"`` (H_n exactly: the GGN, equal to the Fisher for these likelihoods) or
            ``"sampled"`` (one label per example drawn from p(y | f_n) with ``generator``).
        y: the batch's labels, read only for the kept positions (None: all positions, or the
            ``attention_mask`` of a mapping batch).

    Returns:
        name -> (F w) of each parameter's shape, detached.
    """
    return fisher_product(model, x, w, fishleg_options(likelihood, fisher, generator), y)


def fisher_product(
    model: nn.Module,
    x: Any,
    w: Mapping[str, Tensor],
    options: BuildOptions,
    y: Tensor | None = None,
) -> dict[str, Tensor]:
    """:func:`fisher_vector_product` with FishLeg's checked :func:`fishleg_options` (likelihood,
    ``fisher_type`` exact or mc with one sample, ``generator``)."""
    likelihood = options.likelihood
    named = dict(model.named_parameters())
    missing = [n for n in w if n not in named]
    if missing:
        raise ValueError(f"fisher_vector_product: {missing} are not parameters of the model")
    primals = {n: named[n].detach().requires_grad_(True) for n in w}
    tangents = {n: w[n].detach().to(primals[n].dtype) for n in w}

    def f(p: dict[str, Tensor]) -> Tensor:
        return likelihood.check_output(call_model(model, p, x))

    with torch.enable_grad():
        out, jw = jvp(f, (primals,), (tangents,))  # type: ignore[misc]  # out, jw: (N, C); out keeps its graph
        fd, jw = out.detach(), jw.detach()
        kept, count = _kept_outputs(likelihood, fd, x, y)  # (N, T*C) or None; the normaliser
        if kept is not None:
            jw = jw * kept
        if options.fisher_type is FisherType.EXACT:
            hjw = likelihood.hessian_matmul(fd, jw)  # (N, C)
        else:
            ys = likelihood.sample(fd, 1, generator=options.generator)[0]
            r = likelihood.grad_output(fd, ys).reshape(fd.shape)  # (N, C): d nll / d f at sampled y
            r = r if kept is None else r * kept
            hjw = r * (r * jw).sum(-1, keepdim=True)  # r_n (r_n . J_n w)
        if kept is not None:
            hjw = hjw * kept
        grads = torch.autograd.grad(
            out, list(primals.values()), grad_outputs=hjw / count, allow_unused=True
        )
    return {
        n: torch.zeros_like(p) if g is None else g.detach()
        for (n, p), g in zip(primals.items(), grads, strict=True)
    }


def _kept_outputs(
    likelihood: Likelihood, f: Tensor, x: Any, y: Tensor | None
) -> tuple[Tensor | None, Tensor | int]:
    """The kept outputs (N, T*C) of the flat output f (None: all) and the normaliser: N, or the
    number of kept positions for ``positions="mean"`` (a tensor: no host sync)."""
    width = likelihood.width or f.shape[1]
    mask = None
    if y is not None and hasattr(likelihood, "position_mask"):
        mask = likelihood.position_mask(f, likelihood.check_target(f, y, values=False))
    elif likelihood.sequence:
        mask = mapping_mask(x, f.shape[1] // width, likelihood.shift_labels)
    kept = None if mask is None else flat_mask(mask, width).to(f.dtype)
    if getattr(likelihood, "positions", None) is not Positions.MEAN:
        return kept, f.shape[0]
    if mask is None:
        return kept, f.shape[0] * (f.shape[1] // width)
    return kept, mask.sum().clamp_min(1).to(f.dtype)
