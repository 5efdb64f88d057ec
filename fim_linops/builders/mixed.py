r"""Per-layer mixes: ``structure={nn.Linear: "kfac", model.norm: "block_diag", "default": "diag"}``.

Each layer (the trainable parameters owned by one module) gets a structure by, in order: its module
instance as a key, its qualified module name as a key (a string other than "default"), its exact
type, a base class (keys in the mapping's order), then "default". Layers with the same structure
form one group (:func:`plan_mix`). ``fisher()`` then builds the groups: when every group's
structure is a one-pass one (diag, block_diag, dense, kfac), one engine pass over the union feeds
all groups (builders/one_pass.py; MC labels drawn once); otherwise each group is one build
restricted to its parameters (one data pass per group, two for EKFAC). The groups are put
together in a :class:`Mixed` block-diagonal operator (:meth:`MixPlan.assemble`). A group of
"dense", "lowrank" or "implicit" layers keeps the couplings between them. This module plans and
assembles only: it never calls back into ``fisher()``.

A "kfac", "ekfac" or "kron_sum" group is built like that plain structure: its layers without
Kronecker factors (norm layers, raw parameters, modules without a rule, layers demoted by the
first-batch checks) get exact blocks, dense when small, else the diagonal (builders/everywhere.py),
and :meth:`Mixed.describe` names them with the reason; ``strict=True`` makes them an error instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from fim_linops.builders.one_pass import ONE_PASS
from fim_linops.layout import LayerBlock, ParamLayout
from fim_linops.naming import class_name
from fim_linops.operators.base import FisherOperator
from fim_linops.operators.mixed import LayerInfo, Mixed, Spans, spans_of
from fim_linops.structures import Structure


def _resolve(block: LayerBlock, mapping: Mapping[Any, Any]) -> Structure | None:
    module = block.module
    for key, value in mapping.items():
        if isinstance(key, nn.Module) and key is module:
            return Structure.parse(value)
    if block.module_name in mapping and block.module_name != "default":
        return Structure.parse(mapping[block.module_name])
    if type(module) in mapping:
        return Structure.parse(mapping[type(module)])
    for key, value in mapping.items():
        if isinstance(key, type) and isinstance(module, key):
            return Structure.parse(value)
    if "default" in mapping:
        return Structure.parse(mapping["default"])
    return None


def _check_keys(mapping: Mapping[Any, Any]) -> None:
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            raise TypeError(
                "a per-layer structure mix cannot be nested: use one flat dict "
                "{module type | module | module name | 'default': structure name}, e.g. "
                "{nn.Linear: 'kfac', 'encoder.layer.0': 'block_diag', 'default': 'diag'}"
            )
        Structure.parse(value)  # a clear error for unknown names
        if not (
            isinstance(key, (nn.Module, str))
            or (isinstance(key, type) and issubclass(key, nn.Module))
        ):
            raise TypeError(
                f"per-layer structure keys are module types, module instances, module names or "
                f"'default', got {key!r}"
            )


def _to_global(local: Spans, blocks: list[LayerBlock]) -> Spans:
    """Spans in a group's own coordinates (its blocks concatenated) as spans of the public
    vector."""
    starts, offset = [], 0
    for b in blocks:
        starts.append(offset)
        offset += b.numel
    out: list[list[int]] = []
    for lo, hi in local:
        for b, s in zip(blocks, starts, strict=True):
            a, z = max(lo, s), min(hi, s + b.numel)
            if a >= z:
                continue
            g_lo, g_hi = b.start + a - s, b.start + z - s
            if out and out[-1][1] == g_lo:
                out[-1][1] = g_hi
            else:
                out.append([g_lo, g_hi])
    return tuple((lo, hi) for lo, hi in out)


@dataclass(frozen=True)
class MixGroup:
    """The layers of a per-layer mix that get one structure, in the layout's order."""

    structure: Structure
    blocks: tuple[LayerBlock, ...]

    @property
    def params(self) -> list[nn.Parameter]:
        return [e.param for b in self.blocks for e in b.entries]


@dataclass(frozen=True)
class MixPlan:
    """A per-layer mix resolved on ``layout``: its groups, one per structure (in the order of
    their first layer). ``fisher()`` builds one operator per group (all from one engine pass
    when :attr:`one_pass`) and :meth:`assemble` puts them together."""

    layout: ParamLayout
    groups: tuple[MixGroup, ...]

    @property
    def one_pass(self) -> bool:
        """Whether every group is a one-pass structure (builders/one_pass.py): one engine pass
        over the union then feeds all groups."""
        return all(g.structure in ONE_PASS for g in self.groups)

    def assemble(self, ops: list[FisherOperator]) -> FisherOperator:
        """The block-diagonal :class:`Mixed` of the groups' operators (in :attr:`groups` order),
        with a per-layer description. A group whose operator is itself :class:`Mixed` (a
        "kfac"/"ekfac"/"kron_sum" group with layers that have no Kronecker factors: exact blocks
        for those) is flattened into its parts, so that ``structures`` and
        :meth:`Mixed.describe` say what each layer really got."""
        parts: list[FisherOperator] = []
        spans: list[Spans] = []
        structures: list[str] = []
        info: dict[str, LayerInfo] = {}
        for g, op in zip(self.groups, ops, strict=True):
            blocks = list(g.blocks)
            if isinstance(op, Mixed):
                for sub, sp, name in zip(op.ops, op.spans, op.structures, strict=True):
                    parts.append(sub)
                    spans.append(_to_global(sp, blocks))
                    structures.append(name)
                info.update((i.name, i) for i in op.layers)
            else:
                parts.append(op)
                spans.append(spans_of(blocks))
                structures.append(g.structure.value)
            for b in blocks:
                name = b.module_name or "<model>"
                if name not in info:
                    info[name] = LayerInfo(
                        name, type(b.module).__name__, b.numel, g.structure.value
                    )
        layers = tuple(info[b.module_name or "<model>"] for b in self.layout.blocks)
        return Mixed(*parts, spans=tuple(spans), structures=tuple(structures), layers=layers)


def plan_mix(model: nn.Module, params: Any, mapping: Mapping[Any, Any]) -> MixPlan:
    """The groups of ``mapping`` over the layers of ``params`` (None: every trainable
    parameter); raises for a malformed mapping or a layer it does not cover."""
    _check_keys(mapping)
    layout = ParamLayout.from_model(model, params)
    groups: dict[Structure, list[LayerBlock]] = {}
    missing = []
    for block in layout.blocks:
        s = _resolve(block, mapping)
        if s is None:
            missing.append(f"'{block.module_name or '<model>'}' ({class_name(block.module)})")
            continue
        groups.setdefault(s, []).append(block)
    if missing:
        raise ValueError(
            "the per-layer structure mix does not cover modules "
            + ", ".join(missing)
            + "; add them (by type, instance or name) or a 'default' entry"
        )
    return MixPlan(layout, tuple(MixGroup(s, tuple(blocks)) for s, blocks in groups.items()))
