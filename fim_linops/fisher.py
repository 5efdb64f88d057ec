r"""fisher(): data -> engine -> statistics -> operator.

F = 1/N sum_n E_{y ~ p(y|x_n)}[g g^T], g = grad_theta (-log p(y | x_n)) (NNGeometry's FIM
normalisation), in the public vector order of ``parameters_to_vector`` over the trainable
parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fim_linops.builders import BUILDERS, BuildContext
from fim_linops.builders.guards import check_memory, check_strict
from fim_linops.builders.mixed import plan_mix
from fim_linops.engine import Engine, FisherType
from fim_linops.engine.view import EngineView
from fim_linops.frame import run_build
from fim_linops.layout import ParamLayout
from fim_linops.likelihoods import Likelihood
from fim_linops.operators.base import FisherOperator
from fim_linops.options import MAX_DENSE_BYTES, BuildOptions
from fim_linops.sharding.gather import on_plain_model
from fim_linops.structures import Structure

__all__ = ["MAX_DENSE_BYTES", "build_fisher", "fisher", "fisher_one_pass"]


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
    options = BuildOptions.of_arguments(locals())
    return build_fisher(model, data, structure, options)


def build_fisher(
    model: nn.Module, data: Any, structure: str | Structure | dict, options: BuildOptions
) -> FisherOperator:
    """:func:`fisher` on checked options: the structure's builder (a per-layer mix: one operator
    per structure group, from one engine pass when every group allows it) run in the frame of
    :func:`fim_linops.frame.run_build`. For callers on a plain (not FSDP/DDP-wrapped) model."""
    if isinstance(structure, dict):  # per-layer mix: one operator per structure group
        plan = plan_mix(model, options.params, structure)
        if len(plan.groups) == 1:
            return build_fisher(model, data, plan.groups[0].structure, options)
        if plan.one_pass:  # one engine pass feeds every group
            groups = [(g.structure, g.params) for g in plan.groups]
            ops = fisher_one_pass(model, data, groups, options)
        else:
            ops = [
                build_fisher(model, data, g.structure, options.but(params=g.params))
                for g in plan.groups
            ]
        return plan.assemble(ops)
    struct = Structure.parse(structure)

    def prepare(
        work: nn.Module, layout: ParamLayout, dt: torch.dtype
    ) -> Callable[[BuildContext], FisherOperator]:
        check_memory(struct, layout, dt, options.max_bytes)

        def build(ctx: BuildContext) -> FisherOperator:
            engine = ctx.engine
            if struct.kronecker and options.strict:
                check_strict(engine, struct)
            elif struct.kronecker and (
                engine.fallback or not all(r.rule.has_kfac for r in engine.ruled)
            ):
                from fim_linops.builders.everywhere import build_everywhere

                return build_everywhere(ctx, struct)  # exact blocks where no factors exist
            if struct is Structure.KFAC and options.kfac_approx == "expand":  # rows as they come
                engine.rows_free.update(id(rb.module) for rb in engine.ruled)
            return BUILDERS[struct](ctx)  # every Structure registers a builder

        return build

    return run_build(model, data, options, prepare)


@on_plain_model
def fisher_one_pass(
    model: nn.Module,
    data: Any,
    groups: list[tuple[Structure, list[nn.Parameter]]],
    options: BuildOptions,
) -> list[FisherOperator]:
    """One operator per (structure, parameters) group, every structure a one-pass one
    (``builders.one_pass.ONE_PASS``), all from one engine pass over the union of the groups (the
    same checks and state guarantees as :func:`fisher`; ``options.params`` is replaced by that
    union). A "kfac" group of a per-layer mix is built like ``structure="kfac"``: its layers
    without Kronecker factors get exact blocks (builders/everywhere.py), or, with
    ``options.strict``, are an error that names them."""
    from fim_linops.builders.one_pass import Group, build_one_pass

    union = [p for _, ps in groups for p in ps]
    strict = options.strict

    def prepare(
        work: nn.Module, layout: ParamLayout, dt: torch.dtype
    ) -> Callable[[BuildContext], list[FisherOperator]]:
        by_name = dict(work.named_parameters())
        plan = []
        for struct, ps in groups:
            names = {e.name for e in ParamLayout.from_model(model, ps).entries}
            group_layout = ParamLayout.from_model(
                work, params=[by_name[e.name] for e in layout.entries if e.name in names]
            )
            check_memory(struct, group_layout, dt, options.max_bytes)
            if struct.kronecker and strict:  # the group's layers alone (construction only)
                o = options
                engine = Engine(work, group_layout, o.likelihood, o.fisher_type, o.mc_samples)
                check_strict(engine, struct, in_mix=True)
            plan.append(Group(struct, group_layout))

        def build(ctx: BuildContext) -> list[FisherOperator]:
            from fim_linops.builders.everywhere import split_mix_groups

            if strict:  # again on the build's engine: the first batch may have demoted layers
                for g in (g for g in plan if g.structure.kronecker):
                    check_strict(EngineView(ctx.engine, g.layout), g.structure, True)
            flat, assemble = (plan, list) if strict else split_mix_groups(ctx.engine, plan)
            if (
                options.kfac_approx == "expand"
            ):  # the kfac groups' factors take the rows as they come
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

    return run_build(model, data, options.but(params=union), prepare)
