r"""Kronecker structures on every model: ``structure="kfac"``, ``"ekfac"`` or ``"kron_sum"`` on a
model with layers that have no Kronecker factorisation.

Every layer (the trainable parameters owned by one module) whose rule has Kronecker factors gets
them; every other layer gets an exact block, chosen by its size p:

* p <= :data:`EXACT_DENSE_MAX` (4096 parameters, a 64 MiB block in float32): its dense block
  F_ll = 1/N sum_{n,k} J_nk,l J_nk,l^T (the "block_diag" statistic);
* larger: its exact diagonal (the "diag" statistic).

Which layers are not Kronecker-factored: norm layers' affine parameters (LayerNorm, GroupNorm,
BatchNorm: no Kronecker factorisation), modules without a rule (raw ``nn.Parameter``\s, custom
modules, parameters shared between modules: torch.func), and ruled layers that the first-batch
checks sent to torch.func (engine/checks.py). The result is a :class:`Mixed` operator (exact solve,
logdet, root, eigh per group) whose :meth:`Mixed.describe` lists each layer with its structure and,
for every layer that is not Kronecker-factored, the reason.

Data passes: kfac one (the Kronecker factors and the exact blocks are sums over the same batches,
builders/one_pass.py); ekfac two (the first pass also feeds the exact blocks, the second refits the
eigenvalues); kron_sum one for the exact blocks plus its own passes. The MC labels are drawn once,
in the first pass, and reused by every later one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor

from fim_linops.builders.base import BuildContext, RecordingContext
from fim_linops.builders.one_pass import Group, build_one_pass
from fim_linops.engine import BatchResult, Engine, FisherType
from fim_linops.engine.view import EngineView
from fim_linops.layout import LayerBlock, ParamLayout
from fim_linops.operators.base import FisherOperator
from fim_linops.operators.mixed import LayerInfo, Mixed, spans_of
from fim_linops.structures import Structure

NO_FACTORS = "no Kronecker factorisation"
NO_RULE = "no Kronecker rule"

#: the largest layer (parameters) that gets its dense exact block; larger ones get their diagonal
EXACT_DENSE_MAX = 4096


def _shared(engine: Engine, block: LayerBlock) -> bool:
    """Whether the module shares a parameter with another module."""
    own = [p for p in block.module._parameters.values() if p is not None]
    return any(
        p is q
        for m in engine.model.modules()
        if m is not block.module
        for q in m._parameters.values()
        for p in own
    )


def non_kronecker(engine: Engine) -> list[tuple[LayerBlock, str]]:
    """(block, why) for each layer of ``engine`` without Kronecker factors, in the public order."""
    why: dict[int, str] = {}
    demoted = getattr(engine, "base", engine).demoted  # an EngineView reads its engine's
    for rb in engine.ruled:
        if not rb.rule.has_kfac:
            why[id(rb.block)] = NO_FACTORS
    for block in engine.fallback:
        if id(block.module) in demoted:
            why[id(block)] = demoted[id(block.module)]
        elif _shared(engine, block):
            why[id(block)] = "a parameter shared with another module"
        elif rule_names_other(block):
            why[id(block)] = other_names_reason(block)
        else:
            why[id(block)] = unsupported_reason(block) or NO_RULE
    return [(b, why[id(b)]) for b in engine.layout.blocks if id(b) in why]


def rule_names_other(block: LayerBlock) -> bool:
    """A ruled module type holding other parameters (e.g. raw parameters registered on it)."""
    from fim_linops.engine.rules import rule_for

    rule = rule_for(block.module)
    return rule is not None and any(n not in rule.param_names for n in block.local_names)


def other_names_reason(block: LayerBlock) -> str:
    """Why a ruled module type holding parameters its rule does not cover has no factors."""
    from fim_linops.engine.rules import rule_for

    rule = rule_for(block.module)
    covered = rule.param_names if rule is not None else ("weight", "bias")
    others = [n for n in block.local_names if n not in covered]
    return f"parameters other than {' and '.join(covered)} ({', '.join(others)}): no Kronecker rule"


def unsupported_reason(block: LayerBlock) -> str:
    """The reason a registered rule gives for not serving this module ("" when none does)."""
    from fim_linops.engine.rules.base import RULES, ruled_type

    cls = ruled_type(block.module)
    return RULES[cls].unsupported_reason(block.module) if cls is not None else ""


def exact_structure(numel: int) -> Structure:
    """The exact structure of a non-Kronecker layer of ``numel`` parameters."""
    return Structure.BLOCK_DIAG if numel <= EXACT_DENSE_MAX else Structure.DIAG


@dataclass
class Plan:
    """The groups of the build: (structure, blocks) in the order of first appearance, and the
    per-layer description."""

    groups: dict[Structure, list[LayerBlock]]
    layers: tuple[LayerInfo, ...]


def plan(engine: Engine, structure: Structure) -> Plan:
    exact = dict((id(b), why) for b, why in non_kronecker(engine))
    groups: dict[Structure, list[LayerBlock]] = {}
    layers = []
    for block in engine.layout.blocks:
        why = exact.get(id(block))
        s = structure if why is None else exact_structure(block.numel)
        groups.setdefault(s, []).append(block)
        layers.append(
            LayerInfo(
                block.module_name or "<model>",
                type(block.module).__name__,
                block.numel,
                s.value,
                why or "",
            )
        )
    return Plan(groups, tuple(layers))


def _layout(engine: Engine, blocks: list[LayerBlock]) -> ParamLayout:
    return ParamLayout.from_model(engine.model, params=[e.param for b in blocks for e in b.entries])


def build_everywhere(ctx: BuildContext, structure: Structure) -> FisherOperator:
    """``structure`` (kfac, ekfac or kron_sum) over the Kronecker-factored layers, exact blocks
    over the others, as one :class:`Mixed` operator."""
    engine = ctx.engine
    p = plan(engine, structure)
    kron = p.groups.pop(structure, [])
    exact = list(p.groups.items())  # block_diag and/or diag
    expand = ctx.options.kfac_approx == "expand"
    if structure is Structure.KFAC and expand:  # the factors need the rows only (checks.py)
        engine.rows_free.update(id(b.module) for b in kron)
    columns: list[Tensor] | None = [] if engine.fisher_type is FisherType.MC else None
    first = RecordingContext.of(ctx, columns)
    one_pass = [Group(s, _layout(engine, blocks)) for s, blocks in exact]
    ops: list[FisherOperator] = []
    order: list[tuple[Structure, list[LayerBlock]]] = []
    if kron:
        kron_layout = _layout(engine, kron)
        view = EngineView(engine, kron_layout)

        def later() -> Iterator[BatchResult]:
            for res in ctx.results(columns=columns):
                yield view.result(res)
                del res  # release this batch before the engine makes the next

        if structure is Structure.KFAC:
            one_pass.insert(0, Group(Structure.KFAC, kron_layout))
            ops = build_one_pass(first, one_pass)
        elif structure is Structure.EKFAC:
            from fim_linops.builders.ekfac import ekfac_from_kfac

            one_pass.insert(0, Group(Structure.KFAC, kron_layout))
            kfac, *rest = build_one_pass(first, one_pass)
            ops = [ekfac_from_kfac(ctx, view, kfac, later()), *rest]
        else:
            from fim_linops.builders.kron_sum import kron_sum_over

            rest = build_one_pass(first, one_pass)
            ops = [kron_sum_over(ctx, view, lambda _first: later()), *rest]
        order.append((structure, kron))
    else:
        ops = build_one_pass(first, one_pass)
    order += exact
    return Mixed(
        *ops,
        spans=tuple(spans_of(blocks) for _, blocks in order),
        structures=tuple(s.value for s, _ in order),
        layers=p.layers,
    )


def split_mix_groups(
    engine: Engine, groups: list[Group]
) -> tuple[list[Group], Callable[[list[FisherOperator]], list[FisherOperator]]]:
    """A per-layer mix's one-pass groups with each "kfac" group split like a plain
    ``structure="kfac"`` build: its Kronecker-factored layers stay "kfac", the others get their
    exact structure by size. Returns the groups to feed :func:`build_one_pass` and the function
    that turns their operators back into one operator per given group (a :class:`Mixed`, in the
    group's own coordinates and with its per-layer description, for a group that was split)."""
    flat: list[Group] = []
    parts: list[tuple[int, Plan | None, list[list[LayerBlock]]]] = []  # (count, plan, blocks)
    for g in groups:
        p = plan(EngineView(engine, g.layout), g.structure) if g.structure.kronecker else None
        if p is None or list(p.groups) == [g.structure]:
            flat.append(g)
            parts.append((1, None, []))
            continue
        view = EngineView(engine, g.layout)
        order = list(p.groups.items())
        flat += [Group(s, _layout(view, blocks)) for s, blocks in order]
        parts.append((len(order), p, [blocks for _, blocks in order]))

    def assemble(ops: list[FisherOperator]) -> list[FisherOperator]:
        out: list[FisherOperator] = []
        i = 0
        for count, p, blocks in parts:
            if p is None:
                out.append(ops[i])
            else:
                out.append(
                    Mixed(
                        *ops[i : i + count],
                        spans=tuple(spans_of(b) for b in blocks),
                        structures=tuple(s.value for s in p.groups),
                        layers=p.layers,
                    )
                )
            i += count
        return out

    return flat, assemble
