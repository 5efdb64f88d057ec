r"""Per-layer mixes: ``structure={nn.Linear: "kfac", model.norm: "block_diag", "default": "diag"}``.

Each layer (the trainable parameters owned by one module) gets a structure by, in order: its module
instance as a key, its qualified module name as a key (a string other than "default"), its exact
type, a base class (keys in the mapping's order), then "default". Layers with the same structure
form one group. When every group's structure is a one-pass one (diag, block_diag, dense, kfac),
one engine pass over the union feeds all groups (builders/one_pass.py; MC labels drawn once);
otherwise each group is one ``fisher()`` call restricted to its parameters (one data pass per
group, two for EKFAC). The groups are put together in a :class:`Mixed` block-diagonal operator. A group of "dense", "lowrank" or "implicit" layers keeps the couplings between them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fim_linops.layout import LayerBlock, ParamLayout
from fim_linops.naming import class_name
from fim_linops.operators.base import FisherOperator
from fim_linops.operators.mixed import Mixed, Spans
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
    return Mixed(
        *ops,
        spans=tuple(_spans(b) for b in groups.values()),
        structures=tuple(s.value for s in groups),
    )
