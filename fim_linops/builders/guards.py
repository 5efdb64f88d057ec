r"""Checks of a build that run before any data pass: the memory of dense and block storage, and
``strict=True``'s demand for Kronecker factors on every layer."""

from __future__ import annotations

import torch

from fim_linops.builders.everywhere import NO_FACTORS, NO_RULE, non_kronecker
from fim_linops.engine import Engine
from fim_linops.layout import ParamLayout
from fim_linops.memory_guard import check_bytes, fitting_structures
from fim_linops.naming import class_name
from fim_linops.structures import Structure


def check_memory(
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


def check_strict(engine: Engine, structure: Structure, in_mix: bool = False) -> None:
    """``strict=True``: raise when a layer has no Kronecker factors, naming each such layer and
    why, with a per-layer mix that moves exactly those layers to an exact structure."""
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
