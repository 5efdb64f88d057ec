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
from fim_linops.builders.mixed import plan_mix
from fim_linops.distributed import resolve_group
from fim_linops.engine import Engine, FisherType, prepare_model
from fim_linops.engine.checks import UnruledLayers
from fim_linops.engine.dropout import warn_active_dropout
from fim_linops.engine.engine import HALF
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood, get_likelihood
from fim_linops.memory_guard import DEFAULT_MAX_BYTES, check_bytes, fitting_structures
from fim_linops.naming import class_name
from fim_linops.operators.base import FisherOperator
from fim_linops.sharding.gather import on_plain_model
from fim_linops.state import preserved_state
from fim_linops.structures import Structure

#: default limit on the bytes of one dense (P x P) or block allocation before asking for consent
MAX_DENSE_BYTES = DEFAULT_MAX_BYTES

R = TypeVar("R")


def _check_memory(
    structure: Structure, layout: ParamLayout, dtype: torch.dtype, max_bytes: int | None
) -> None:
    """Dense storage is P x P, block-diagonal storage sum_b p_b x p_b: checked before the build.
    The error names only the structures whose storage fits the same ``max_bytes``."""
    if max_bytes is None or structure not in (Structure.DENSE, Structure.BLOCK_DIAG):
        return
    S = Structure
    shape: tuple[int, ...]
    others: tuple[Structure, ...]
    if structure is S.DENSE:
        what, shape = f"structure='dense' for P={layout.numel:,} parameters", (layout.numel,) * 2
        others = (S.BLOCK_DIAG, S.KFAC, S.EKFAC, S.DIAG, S.IMPLICIT)
    else:
        largest = max(layout.blocks, key=lambda b: b.numel)
        what = (
            f"structure='block_diag' for P={layout.numel:,} parameters (largest block "
            f"'{largest.module_name or '<model>'}', {largest.numel:,} parameters)"
        )
        shape = (sum(b.numel**2 for b in layout.blocks),)
        others = (S.KFAC, S.EKFAC, S.DIAG, S.IMPLICIT)
    fix = fitting_structures(layout, dtype, max_bytes, others, lowrank=True)
    check_bytes(what, shape, dtype, max_bytes, fix)


def _kfac_approx(value: str) -> str:
    if value not in ("expand", "reduce"):
        raise ValueError(f"unknown kfac_approx {value!r}; use 'expand' or 'reduce'")
    return value


def _check_kronecker(engine: Engine, structure: Structure, in_mix: bool = False) -> None:
    """``strict=True``: raise when a layer has no Kronecker factors, naming each such layer and
    why, with a per-layer mix that moves exactly those layers to an exact structure."""
    from fim_linops.builders.everywhere import NO_FACTORS, NO_RULE, non_kronecker

    bad = non_kronecker(engine)
    if not bad:
        return
    listed = ", ".join(
        f"'{b.module_name or '<model>'}' ({class_name(b.module)}: {why})" for b, why in bad
    )
    keys: list[str] = []
    bad_names = {b.module_name for b, _ in bad}
    for b, why in bad:  # a type that has no Kronecker rule anywhere in the model, else the name
        t = type(b.module)
        by_type = (
            why in (NO_FACTORS, NO_RULE)
            and t.__module__.startswith("torch.nn")
            and all(x.module_name in bad_names for x in engine.layout.blocks if type(x.module) is t)
        )
        if by_type:
            key = class_name(t)
        else:  # the root module's own parameters: its class names it
            key = f"'{b.module_name}'" if b.module_name else class_name(t)
        if key not in keys:
            keys.append(key)
    mix = (
        "{"
        + "".join(f"{k}: 'block_diag', " for k in keys[:4])
        + f"'default': '{structure.value}'}}"
    )
    lead = (
        f"the per-layer mix's '{structure.value}' group"
        if in_mix
        else f"structure='{structure.value}' with strict=True"
    )
    drop = "" if in_mix else "drop strict=True (those layers then get exact blocks), "
    raise ValueError(
        f"{lead} has no Kronecker factors for module "
        + listed
        + f"; {drop}use a per-layer mix such as {mix}, or structure='block_diag', 'diag' or "
        "'implicit'"
    )


@on_plain_model
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
    strict: bool = False,
) -> FisherOperator:
    r"""The Fisher information matrix of ``model`` on ``data`` as a LinearOperator (P, P).

    Args:
        model: any ``nn.Module``; left exactly as found (parameters, ``.grad``, mode, hooks).
        data: a DataLoader, an iterable of (x, y) batches, or one (x, y) batch; x a tensor
            (``model(x)``), a tuple of tensors (``model(*x)``) or a dict of tensors
            (``model(**x)``, keyword arguments), examples first.
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
            over it, :class:`fim_linops.MemoryLimitError` names a structure that fits; also the
            budget of each chunk of the exact Fisher's columns (docs/language_models.md).
        kfac_approx: for layers applied at several positions (sequences, convolutions),
            "expand" (positions as extra examples) or "reduce" (inputs averaged and output
            gradients summed over positions per example), Eschenhagen et al. 2023. "expand"
            takes each Linear call's rows as they come (e.g. (B, 2, D) inputs reshaped to
            (2B, D)); every other statistic needs the examples on the first dim of each call.
        strict: for "kfac", "ekfac" and "kron_sum": raise when a layer has no Kronecker
            factors. By default such layers (norms' affine parameters, raw parameters, modules
            without a rule or sent to torch.func) get exact blocks: their dense block up to
            ``builders.everywhere.EXACT_DENSE_MAX`` parameters, else their exact diagonal;
            ``F.describe()`` lists each layer's structure and why (docs/structures.md).
        process_group: a torch.distributed group; by default the world group when
            torch.distributed is initialised. Each rank passes its own shard of the data; the
            statistics are all-reduced once (implicit products once per product).

    Returns:
        A ``FisherOperator`` (``linear_operator.LinearOperator``) on the model's device and dtype.
    """
    if isinstance(structure, dict):  # per-layer mix: one operator per structure group
        plan = plan_mix(model, params, structure)
        kw: dict[str, Any] = dict(
            likelihood=likelihood, fisher_type=fisher_type, mc_samples=mc_samples, rank=rank,
            device=device, dtype=dtype, progress=progress, generator=generator,
            max_bytes=max_bytes, process_group=process_group, kfac_approx=kfac_approx,
            strict=strict,
        )  # fmt: skip
        if len(plan.groups) == 1:
            return fisher(model, data, structure=plan.groups[0].structure, params=params, **kw)
        if plan.one_pass:  # one engine pass feeds every group
            ops = fisher_one_pass(model, data, [(g.structure, g.params) for g in plan.groups], **kw)
        else:
            ops = [
                fisher(model, data, structure=g.structure, params=g.params, **kw)
                for g in plan.groups
            ]
        return plan.assemble(ops)
    struct = Structure.parse(structure)

    def prepare(
        work: nn.Module, layout: ParamLayout, dt: torch.dtype, lik: Likelihood, ftype: FisherType
    ) -> Callable[[BuildContext], FisherOperator]:
        _check_memory(struct, layout, dt, max_bytes)

        def build(ctx: BuildContext) -> FisherOperator:
            engine = ctx.engine
            if struct.kronecker and strict:
                _check_kronecker(engine, struct)
            elif struct.kronecker and (
                engine.fallback or not all(r.rule.has_kfac for r in engine.ruled)
            ):
                from fim_linops.builders.everywhere import build_everywhere

                return build_everywhere(ctx, struct)  # exact blocks where no factors exist
            if struct is Structure.KFAC and kfac_approx == "expand":  # rows as they come
                engine.rows_free.update(id(rb.module) for rb in engine.ruled)
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
        max_bytes,
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
    max_bytes: int | None = MAX_DENSE_BYTES,
) -> R:
    """The shared frame of a build: checked arguments, the model left as found, the working copy
    (device/dtype), then ``prepare(work, layout, dtype, likelihood, fisher_type)`` (its checks;
    it returns the builder), one engine over ``params`` and the builder run on its context."""
    lik, ftype, layout = _validated(
        model, params, likelihood, fisher_type, mc_samples, dtype, device, generator
    )
    warn_active_dropout(model, "the Fisher", stacklevel=4)  # user -> fisher -> _run -> here
    with preserved_state(model):
        dev_arg = torch.device(device) if device is not None else None
        work, work_layout = prepare_model(model, layout, dev_arg, dtype)
        dev = work_layout.entries[0].param.device
        dt = work_layout.entries[0].param.dtype
        if dt in HALF:  # the half model runs as it is; statistics and operator in float32
            dt = torch.float32
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
        engine.max_bytes = max_bytes
        try:
            return build(context(engine, data))
        except UnruledLayers as raw:  # found in the first forward, before any statistic
            engine = Engine(work, work_layout, lik, ftype, mc_samples, generator)
            engine.max_bytes = max_bytes
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
    device: torch.device | str | None = None,
    generator: Any = None,
) -> tuple[Likelihood, FisherType, ParamLayout]:
    """The parsed likelihood and Fisher type and the layout, after the checks of the arguments."""
    lik = get_likelihood(likelihood)
    ftype = FisherType.parse(fisher_type)
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    layout = ParamLayout.from_model(model, params)
    dtypes = {e.param.dtype for e in layout.entries}
    if len(dtypes) > 1:
        raise ValueError(
            "the selected parameters mix dtypes ("
            + ", ".join(sorted(str(d) for d in dtypes))
            + "); cast the model to one dtype, or pass dtype= (the model is then copied)"
        )
    _check_generator(generator, device, layout)
    return lik, ftype, layout


def _check_generator(
    generator: Any, device: torch.device | str | None, layout: ParamLayout
) -> None:
    """``generator``: None or a ``torch.Generator`` on the device type of the computation."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (or None), got {type(generator).__name__} "
            f"{generator!r}; for a seed pass torch.Generator().manual_seed(seed)"
        )
    dev = torch.device(device) if device is not None else layout.entries[0].param.device
    if generator.device.type != dev.type:
        raise ValueError(
            f"generator is on {generator.device} but the Fisher is computed on {dev}; pass "
            f"torch.Generator(device='{dev}').manual_seed(seed)"
        )


@on_plain_model
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
    strict: bool = True,
) -> list[FisherOperator]:
    """One operator per (structure, parameters) group, every structure a one-pass one
    (``builders.one_pass.ONE_PASS``), all from one engine pass over the union of the groups (the
    same checks and state guarantees as :func:`fisher`). A "kfac" group of a per-layer mix is
    built like ``structure="kfac"``: its layers without Kronecker factors get exact blocks
    (builders/everywhere.py), or, with ``strict=True``, are an error that names them."""
    from fim_linops.builders.one_pass import Group, build_one_pass

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
            if struct.kronecker and strict:  # the group's layers alone (construction only)
                _check_kronecker(
                    Engine(work, group_layout, lik, ftype, mc_samples), struct, in_mix=True
                )
            plan.append(Group(struct, group_layout))

        def build(ctx: BuildContext) -> list[FisherOperator]:
            from fim_linops.builders.everywhere import split_mix_groups

            flat, assemble = (plan, list) if strict else split_mix_groups(ctx.engine, plan)
            if kfac_approx == "expand":  # the kfac groups' factors take the rows as they come
                kron = {
                    b.module_name
                    for g in flat
                    if g.structure is Structure.KFAC
                    for b in g.layout.blocks
                }
                ctx.engine.rows_free.update(
                    id(rb.module) for rb in ctx.engine.ruled if rb.block.module_name in kron
                )
            return assemble(build_one_pass(ctx, flat))

        return build

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
        max_bytes,
    )
