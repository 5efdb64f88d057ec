"""ParamLayout: the flat parameter vector and its per-layer blocks.

The flat order is exactly ``torch.nn.utils.parameters_to_vector`` over the trainable parameters in
``model.named_parameters()`` order (shared parameters once, at their first name). A *block* is the
set of trainable parameters owned directly by one module; a module's direct parameters are
contiguous in that order, so every block is a slice ``[start, stop)`` of the flat vector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fim_linops.naming import class_name


@dataclass(frozen=True)
class ParamEntry:
    """One trainable parameter: its public name, owning module, local name and flat slice."""

    name: str
    param: nn.Parameter = field(repr=False, compare=False)
    module_name: str
    local_name: str
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> torch.Size:
        return self.param.shape


@dataclass(frozen=True)
class LayerBlock:
    """The trainable parameters owned directly by one module: a contiguous flat slice."""

    module_name: str
    module: nn.Module = field(repr=False, compare=False)
    entries: tuple[ParamEntry, ...]

    @property
    def start(self) -> int:
        return self.entries[0].start

    @property
    def stop(self) -> int:
        return self.entries[-1].stop

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def local_names(self) -> tuple[str, ...]:
        return tuple(e.local_name for e in self.entries)

    def entry(self, local_name: str) -> ParamEntry | None:
        for e in self.entries:
            if e.local_name == local_name:
                return e
        return None


class ParamLayout:
    """Flat vector <-> per-parameter tensors, and the per-layer blocks of that vector.

    Build it with :meth:`from_model`. ``params`` restricts to a subset: an iterable of parameters
    and/or modules (a module stands for all its trainable parameters, recursively).
    """

    def __init__(self, entries: Sequence[ParamEntry], blocks: Sequence[LayerBlock]):
        self.entries: tuple[ParamEntry, ...] = tuple(entries)
        self.blocks: tuple[LayerBlock, ...] = tuple(blocks)
        self.numel: int = self.entries[-1].stop if self.entries else 0

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, params: Iterable | None = None) -> ParamLayout:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        selected: set[int] | None = None
        if params is not None:
            if isinstance(params, (nn.Parameter, nn.Module, str)):
                params = [params]
            model_ids = {id(p) for p in model.parameters()}
            model_modules = {id(m) for m in model.modules()}
            selected = set()
            for item in params:
                if isinstance(item, str):
                    item = _by_name(model, item)
                if isinstance(item, nn.Module):
                    if id(item) not in model_modules:
                        raise ValueError(
                            f"params contains a module ({class_name(item)}) that is not part of "
                            "the model; pass modules or parameters of the model itself"
                        )
                    selected.update(id(p) for p in item.parameters() if p.requires_grad)
                elif isinstance(item, Tensor):
                    if id(item) not in model_ids:
                        raise ValueError(
                            f"params contains a tensor of shape {tuple(item.shape)} that is not a "
                            "parameter of the model; pass model parameters or modules"
                        )
                    if not item.requires_grad:
                        raise ValueError(
                            f"params contains a frozen parameter of shape {tuple(item.shape)} "
                            "(requires_grad=False); only trainable parameters have a Fisher"
                        )
                    selected.add(id(item))
                else:
                    raise TypeError(
                        "params must be an iterable of model parameters, modules or their names, "
                        f"got an item of type {type(item).__name__}"
                    )
        # owner of each parameter: the first module (in named_modules order) holding it directly
        owner: dict[int, tuple[str, nn.Module, str]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for local, p in module._parameters.items():
                if p is not None and id(p) not in owner:
                    owner[id(p)] = (mname, module, local)
        entries: list[ParamEntry] = []
        offset = 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if selected is not None and id(p) not in selected:
                continue
            mname, _, local = owner[id(p)]
            entries.append(ParamEntry(name, p, mname, local, offset, offset + p.numel()))
            offset += p.numel()
        if not entries:
            raise ValueError(
                "the model has no trainable parameters in the selection (all frozen or params= "
                "empty); unfreeze some with requires_grad_(True) or pass params="
            )
        blocks: list[LayerBlock] = []
        group: list[ParamEntry] = []
        for e in entries:
            if group and group[-1].module_name != e.module_name:
                blocks.append(
                    LayerBlock(group[0].module_name, owner[id(group[0].param)][1], tuple(group))
                )
                group = []
            group.append(e)
        blocks.append(LayerBlock(group[0].module_name, owner[id(group[0].param)][1], tuple(group)))
        return cls(entries, blocks)

    # -- conversions ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def params(self) -> list[nn.Parameter]:
        return [e.param for e in self.entries]

    @property
    def block_sizes(self) -> list[int]:
        return [b.numel for b in self.blocks]

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (a name -> tensor mapping or a list in layout order)
        into a flat vector of length ``numel``; a leading batch dimension, if any, is kept."""
        if isinstance(tensors, Mapping):
            missing = [e.name for e in self.entries if e.name not in tensors]
            if missing:
                raise ValueError(f"flatten: missing tensors for parameters {missing}")
            items = [tensors[e.name] for e in self.entries]
        else:
            items = list(tensors)
            if len(items) != len(self.entries):
                raise ValueError(f"flatten: expected {len(self.entries)} tensors, got {len(items)}")
        out = []
        for e, t in zip(self.entries, items, strict=True):
            if len(e.shape) and tuple(t.shape[-len(e.shape) :]) != tuple(e.shape):
                raise ValueError(
                    f"flatten: tensor for {e.name} has shape {tuple(t.shape)}, expected {tuple(e.shape)}"
                )
            lead = t.shape[: t.ndim - len(e.shape)]
            out.append(t.reshape(*lead, e.numel))
        return torch.cat(out, dim=-1)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (..., numel) into a name -> tensor dict of views."""
        if vec.shape[-1] != self.numel:
            raise ValueError(
                f"unflatten: expected a vector of length {self.numel}, got {vec.shape[-1]}"
            )
        lead = vec.shape[:-1]
        return {e.name: vec[..., e.start : e.stop].reshape((*lead, *e.shape)) for e in self.entries}

    def vector(self) -> Tensor:
        """The current parameter values as a flat vector (parameters_to_vector order)."""
        return torch.cat([e.param.detach().reshape(-1) for e in self.entries])

    def __repr__(self) -> str:
        return f"ParamLayout(numel={self.numel}, params={len(self.entries)}, blocks={len(self.blocks)})"


def _by_name(model: nn.Module, name: str) -> nn.Parameter | nn.Module:
    """The parameter or module of ``model`` called ``name`` (as in ``named_parameters()`` /
    ``named_modules()``; "" is the model itself)."""
    params = dict(model.named_parameters())
    if name in params:
        return params[name]
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = [n for n in list(params) + [m for m in modules if m] if name in n or n in name][:5]
    raise ValueError(
        f"params contains the name {name!r}, which is neither a parameter nor a module of the "
        "model" + (f"; close names: {', '.join(map(repr, close))}" if close else "")
    )
