r"""Per-layer mixes: ``structure={nn.Linear: "kfac", model.norm: "block_diag", "default": "diag"}``.

Each layer (the trainable parameters owned by one module) gets a structure by, in order: its module
instance as a key, its qualified module name as a key (a string other than "default"), its exact
type, a base class (keys in the mapping's order), then "default". Layers with the same structure
form one group. When every group's structure is a one-pass one (diag, block_diag, dense, kfac),
one engine pass over the union feeds all groups (builders/one_pass.py; MC labels drawn once);
otherwise each group is one ``fisher()`` call restricted to its parameters (one data pass per
group, two for EKFAC). The groups are put together in a :class:`Mixed` block-diagonal operator. A group of "dense", "lowrank" or "implicit" layers keeps the couplings between them.

A "kfac", "ekfac" or "kron_sum" group is built like that plain structure: its layers without
Kronecker factors (norm layers, raw parameters, modules without a rule, layers demoted by the
first-batch checks) get exact blocks, dense when small, else the diagonal (builders/everywhere.py),
and :meth:`Mixed.describe` names them with the reason; ``strict=True`` makes them an error instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fim_linops.layout import LayerBlock, ParamLayout
from fim_linops.naming import class_name
from fim_linops.operators.base import FisherOperator
from fim_linops.operators.mixed import LayerInfo, Mixed, Spans
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


def _spans(blocks: list[LayerBlock]) -> Spans:
    """Merge the blocks' slices where they touch."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][1] == b.start:
            out[-1][1] = b.stop
        else:
            out.append([b.start, b.stop])
    return tuple((lo, hi) for lo, hi in out)


def fisher_mixed(
    fisher: Callable[..., FisherOperator],
    model: nn.Module,
    data: Any,
    mapping: Mapping[Any, Any],
    params: Any = None,
    **kwargs: Any,
) -> FisherOperator:
    """One ``fisher(..., structure=s, params=group)`` per structure group, assembled as
    :class:`Mixed` (or the single group's operator when every layer has the same structure)."""
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
    if len(groups) == 1:
        ((s, _),) = groups.items()
        return fisher(model, data, structure=s, params=params, **kwargs)
    from fim_linops.builders.one_pass import ONE_PASS

    if all(s in ONE_PASS for s in groups):  # one engine pass feeds every group
        from fim_linops.fisher import fisher_one_pass

        params_of = [
            (s, [e.param for b in blocks for e in b.entries]) for s, blocks in groups.items()
        ]
        ops = fisher_one_pass(model, data, params_of, **kwargs)
    else:
        ops = []
        for s, blocks in groups.items():
            group_params = [e.param for b in blocks for e in b.entries]
            ops.append(fisher(model, data, structure=s, params=group_params, **kwargs))
    return _assemble(layout, list(groups.items()), ops)


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


def _assemble(
    layout: ParamLayout,
    groups: list[tuple[Structure, list[LayerBlock]]],
    ops: list[FisherOperator],
) -> Mixed:
    """One :class:`Mixed` over the groups, with a per-layer description. A group whose operator
    is itself :class:`Mixed` (a "kfac"/"ekfac"/"kron_sum" group with layers that have no
    Kronecker factors: exact blocks for those) is flattened into its parts, so that ``structures``
    and :meth:`Mixed.describe` say what each layer really got."""
    parts: list[FisherOperator] = []
    spans: list[Spans] = []
    structures: list[str] = []
    info: dict[str, LayerInfo] = {}
    for (s, blocks), op in zip(groups, ops, strict=True):
        if isinstance(op, Mixed):
            for sub, sp, name in zip(op.ops, op.spans, op.structures, strict=True):
                parts.append(sub)
                spans.append(_to_global(sp, blocks))
                structures.append(name)
            info.update((i.name, i) for i in op.layers)
        else:
            parts.append(op)
            spans.append(_spans(blocks))
            structures.append(s.value)
        for b in blocks:
            name = b.module_name or "<model>"
            if name not in info:
                info[name] = LayerInfo(name, type(b.module).__name__, b.numel, s.value)
    layers = tuple(info[b.module_name or "<model>"] for b in layout.blocks)
    return Mixed(*parts, spans=tuple(spans), structures=tuple(structures), layers=layers)
