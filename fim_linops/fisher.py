r"""fisher(): data -> engine -> statistics -> operator.

F = 1/N sum_n E_{y ~ p(y|x_n)}[g g^T], g = grad_theta (-log p(y | x_n)) (NNGeometry's FIM
normalisation), in the public vector order of ``parameters_to_vector`` over the trainable
parameters.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from fim_linops.builders import BUILDERS, BuildContext
from fim_linops.distributed import resolve_group
from fim_linops.engine import Engine, FisherType, prepare_model
from fim_linops.engine.checks import UnruledLayers
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood, get_likelihood
from fim_linops.memory_guard import DEFAULT_MAX_BYTES, check_bytes
from fim_linops.operators.base import FisherOperator
from fim_linops.sharding import gathered, is_sharded
from fim_linops.state import preserved_state
from fim_linops.structures import Structure

#: default limit on the bytes of one dense (P x P) or block allocation before asking for consent
MAX_DENSE_BYTES = DEFAULT_MAX_BYTES

R = TypeVar("R")


def _check_memory(
    structure: Structure, layout: ParamLayout, dtype: torch.dtype, max_bytes: int | None
) -> None:
    """Dense storage is P x P, block-diagonal storage sum_b p_b x p_b: checked before the build."""
    if structure is Structure.DENSE:
        check_bytes(
            f"structure='dense' for P={layout.numel} parameters",
            (layout.numel, layout.numel),
            dtype,
            max_bytes,
            "use structure='kfac', 'block_diag', 'diag' or 'implicit'",
        )
    elif structure is Structure.BLOCK_DIAG:
        check_bytes(
            f"structure='block_diag' for P={layout.numel} parameters (largest block "
            f"{max(b.numel for b in layout.blocks)})",
            (sum(b.numel**2 for b in layout.blocks),),
            dtype,
            max_bytes,
            "use structure='kfac', 'diag' or 'implicit'",
        )


def _kfac_approx(value: str) -> str:
    if value not in ("expand", "reduce"):
        raise ValueError(f"unknown kfac_approx {value!r}; use 'expand' or 'reduce'")
    return value


def _check_kronecker(engine: Engine, structure: Structure) -> None:
    bad = [
        f"'{rb.block.module_name}' ({type(rb.module).__name__}: no Kronecker factorisation)"
        for rb in engine.ruled
        if not rb.rule.has_kfac
    ]
    if not engine.fallback and not bad:
        return
    for block in engine.fallback:
        kind = type(block.module).__name__
        why = "no Kronecker rule"
        shared = any(
            p is not None
            and any(
                p is q
                for m in engine.model.modules()
                if m is not block.module
                for q in m._parameters.values()
            )
            for p in block.module._parameters.values()
        )
        if shared:
            why = "a parameter shared with another module"
        elif id(block.module) in engine.demoted:
            why = engine.demoted[id(block.module)]
        name = block.module_name or "<model>"
        bad.append(f"'{name}' ({kind}: {why})")
    demoted = [b.module_name for b in engine.fallback if id(b.module) in engine.demoted]
    mix = (
        "{" + ", ".join(f"'{n}': 'block_diag'" for n in demoted[:3]) + f", 'default': "
        f"'{structure.value}'}}"
        if demoted
        else "{nn.Linear: 'kfac', 'default': 'block_diag'}"
    )
    raise ValueError(
        f"structure='{structure.value}' has no rule for module "
        + ", ".join(bad)
        + f"; use structure='block_diag', 'diag' or 'implicit', a per-layer mix such as {mix}, "
        "or restrict params= to the Linear/Conv/Embedding layers"
    )


def fisher(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    structure: str | Structure = "kfac",
    fisher_type: str | FisherType = "exact",
    mc_samples: int = 1,
    params: Any = None,
    rank: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    max_bytes: int | None = MAX_DENSE_BYTES,
    process_group: Any = None,
    kfac_approx: str = "expand",
) -> FisherOperator:
    r"""The Fisher information matrix of ``model`` on ``data`` as a LinearOperator (P, P).

    Args:
        model: any ``nn.Module``; left exactly as found (parameters, ``.grad``, mode, hooks).
        data: a DataLoader, an iterable of (x, y) batches, or one (x, y) batch.
        likelihood: "categorical" (logits), "gaussian" (unit variance unless fl.Gaussian(sigma)),
            "bernoulli" (one logit), or an ``fl.Likelihood``.
        structure: "dense", "block_diag", "diag", "kfac", "ekfac", "quasi_diag", "lowrank"
            (``rank=k``), "kron_sum" (``rank=r`` terms per layer) or "implicit"; or a per-layer mix
            {module type | module | module name | "default": structure} (block-diagonal by group).
        fisher_type: "exact" (closed-form expectation = GGN), "mc" (``mc_samples`` sampled
            labels, drawn with ``generator``) or "empirical" (the labels in ``data``).
        params: None (all trainable parameters) or an iterable of parameters/modules (objects
            or their names in ``named_parameters()`` / ``named_modules()``).
        device: where to compute (the model is copied if needed).
        dtype: in which precision to compute (the model is copied if needed).
        progress: tqdm progress bar over the batches.
        max_bytes: memory guard for dense and block-diagonal storage (bytes; None: no limit);
            over it, :class:`fim_linops.MemoryLimitError` names a structure that fits.
        kfac_approx: for layers applied at several positions (sequences, convolutions),
            "expand" (positions as extra examples) or "reduce" (inputs averaged and output
            gradients summed over positions per example), Eschenhagen et al. 2023.
        process_group: a torch.distributed group; by default the world group when
            torch.distributed is initialised. Each rank passes its own shard of the data; the
            statistics are all-reduced once (implicit products once per product).

    Returns:
        A ``FisherOperator`` (``linear_operator.LinearOperator``) on the model's device and dtype.
    """
    if is_sharded(model):  # FSDP2 / DDP: the build runs on the gathered plain module
        with gathered(model) as plain:
            return fisher(
                plain,
                data,
                likelihood,
                structure,
                fisher_type,
                mc_samples,
                params,
                rank,
                device,
                dtype,
                progress,
                generator,
                max_bytes,
                process_group,
                kfac_approx,
            )
    if isinstance(structure, dict):  # per-layer mix: one fisher() per structure group
        from fim_linops.builders.mixed import fisher_mixed

        return fisher_mixed(
            fisher,
            model,
            data,
            structure,
            params=params,
            likelihood=likelihood,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            rank=rank,
            device=device,
            dtype=dtype,
            progress=progress,
            generator=generator,
            max_bytes=max_bytes,
            process_group=process_group,
            kfac_approx=kfac_approx,
        )
    struct = Structure.parse(structure)

    def prepare(
        work: nn.Module, layout: ParamLayout, dt: torch.dtype, lik: Likelihood, ftype: FisherType
    ) -> Callable[[BuildContext], FisherOperator]:
        _check_memory(struct, layout, dt, max_bytes)

        def build(ctx: BuildContext) -> FisherOperator:
            if struct.kronecker:
                _check_kronecker(ctx.engine, struct)
            return BUILDERS[struct](ctx)  # every Structure registers a builder

        return build

    return _run(
        model,
        data,
        params,
        likelihood,
        fisher_type,
        mc_samples,
        device,
        dtype,
        progress,
        generator,
        process_group,
        kfac_approx,
        rank,
        prepare,
    )


def _run(
    model: nn.Module,
    data: Any,
    params: Any,
    likelihood: str | Likelihood,
    fisher_type: str | FisherType,
    mc_samples: int,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    progress: bool,
    generator: torch.Generator | None,
    process_group: Any,
    kfac_approx: str,
    rank: int | None,
    prepare: Callable[
        [nn.Module, ParamLayout, torch.dtype, Likelihood, FisherType],
        Callable[[BuildContext], R],
    ],
) -> R:
    """The shared frame of a build: checked arguments, the model left as found, the working copy
    (device/dtype), then ``prepare(work, layout, dtype, likelihood, fisher_type)`` (its checks;
    it returns the builder), one engine over ``params`` and the builder run on its context."""
    lik, ftype, layout = _validated(model, params, likelihood, fisher_type, mc_samples, dtype)
    with preserved_state(model):
        dev_arg = torch.device(device) if device is not None else None
        work, work_layout = prepare_model(model, layout, dev_arg, dtype)
        dev = work_layout.entries[0].param.device
        dt = work_layout.entries[0].param.dtype
        build = prepare(work, work_layout, dt, lik, ftype)

        def context(engine: Engine, data: Any) -> BuildContext:
            return BuildContext(
                engine,
                data,
                dev,
                dt,
                progress=progress,
                rank=rank,
                group=resolve_group(process_group),
                options={"kfac_approx": _kfac_approx(kfac_approx)},
            )

        engine = Engine(work, work_layout, lik, ftype, mc_samples, generator)
        try:
            return build(context(engine, data))
        except UnruledLayers as raw:  # found in the first forward, before any statistic
            engine = Engine(work, work_layout, lik, ftype, mc_samples, generator)
            engine.demote(raw.reasons)
            if isinstance(data, Iterator):  # one-shot: the batch it already gave comes first
                data = itertools.chain([raw.batch], data)
            return build(context(engine, data))


def _validated(
    model: nn.Module,
    params: Any,
    likelihood: str | Likelihood,
    fisher_type: str | FisherType,
    mc_samples: int,
    dtype: torch.dtype | None,
) -> tuple[Likelihood, FisherType, ParamLayout]:
    """The parsed likelihood and Fisher type and the layout, after the checks of the arguments."""
    lik = get_likelihood(likelihood)
    ftype = FisherType.parse(fisher_type)
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    layout = ParamLayout.from_model(model, params)
    for e in layout.entries:
        if e.param.dtype in (torch.float16, torch.bfloat16) and dtype is None:
            raise TypeError(
                f"parameter '{e.name}' is {e.param.dtype}; Fisher statistics in half precision are "
                "not accurate: pass dtype=torch.float32 (the model is copied and upcast)"
            )
    return lik, ftype, layout


def fisher_one_pass(
    model: nn.Module,
    data: Any,
    groups: list[tuple[Structure, list[nn.Parameter]]],
    likelihood: str | Likelihood = "categorical",
    fisher_type: str | FisherType = "exact",
    mc_samples: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    max_bytes: int | None = MAX_DENSE_BYTES,
    process_group: Any = None,
    kfac_approx: str = "expand",
    rank: int | None = None,
) -> list[FisherOperator]:
    """One operator per (structure, parameters) group, every structure a one-pass one
    (``builders.one_pass.ONE_PASS``), all from one engine pass over the union of the groups (the
    same checks and state guarantees as :func:`fisher`)."""
    from fim_linops.builders.one_pass import Group, build_one_pass

    if is_sharded(model):  # FSDP2 / DDP: the build runs on the gathered plain module
        with gathered(model) as plain:
            return fisher_one_pass(
                plain,
                data,
                groups,
                likelihood,
                fisher_type,
                mc_samples,
                device,
                dtype,
                progress,
                generator,
                max_bytes,
                process_group,
                kfac_approx,
                rank,
            )

    union = [p for _, ps in groups for p in ps]

    def prepare(
        work: nn.Module, layout: ParamLayout, dt: torch.dtype, lik: Likelihood, ftype: FisherType
    ) -> Callable[[BuildContext], list[FisherOperator]]:
        by_name = dict(work.named_parameters())
        plan = []
        for struct, ps in groups:
            names = {e.name for e in ParamLayout.from_model(model, ps).entries}
            group_layout = ParamLayout.from_model(
                work, params=[by_name[e.name] for e in layout.entries if e.name in names]
            )
            _check_memory(struct, group_layout, dt, max_bytes)
            if struct.kronecker:  # a check of the group's layers alone (construction only)
                _check_kronecker(Engine(work, group_layout, lik, ftype, mc_samples), struct)
            plan.append(Group(struct, group_layout))
        return lambda ctx: build_one_pass(ctx, plan)

    return _run(
        model,
        data,
        union,
        likelihood,
        fisher_type,
        mc_samples,
        device,
        dtype,
        progress,
        generator,
        process_group,
        kfac_approx,
        rank,
        prepare,
    )
