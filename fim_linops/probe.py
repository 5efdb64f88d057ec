"""A few examples of the data for structural checks of the model (engine/paths.py), taken without
disturbing the data: no extra epoch of a DataLoader (no sampler draw from the global random
state, no worker start-up: the examples come from its dataset and collate function), and no extra
pass over any other iterable (the build continues the pass that gave the first batch; a one-shot
iterator gets its first batch back)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from fim_linops.data import _looks_like_one_batch, batch_size, iter_batches, move

#: examples per probe: one runs every layer once, at the least cost
PROBE_EXAMPLES = 1


def first_examples(x: Any) -> Any:
    """The first PROBE_EXAMPLES examples of a model input, for ``Engine(..., probe=...)``."""
    return _head(x, PROBE_EXAMPLES)


def _head(x: Any, n: int) -> Any:
    """The first n examples of an input (tensor, tuple/list or dict of tensors)."""
    if isinstance(x, Tensor):
        return x[:n]
    if isinstance(x, Mapping):
        return {k: _head(v, n) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_head(v, n) for v in x)
    return x


def probe_input(
    data: Any, device: torch.device | None, dtype: torch.dtype | None
) -> tuple[Any | None, Any]:
    """(x, data): the inputs of up to PROBE_EXAMPLES examples (None for empty or malformed data,
    which the build reports) and the data to use afterwards: the same object, or one whose first
    pass continues the pass that gave the first batch (an iterable that is not a map-style
    DataLoader, e.g. a loader over an IterableDataset), or for a one-shot iterator one that yields
    the taken batch first."""
    first: Any = None
    dataset: Any = getattr(data, "dataset", None)
    if (
        isinstance(data, DataLoader)
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__len__")
        and hasattr(dataset, "__getitem__")
    ):  # map-style: index the dataset, no epoch of the loader
        if len(dataset) == 0:
            return None, data
        count = min(PROBE_EXAMPLES, len(dataset))
        try:
            first = data.collate_fn([dataset[i] for i in range(count)])
        except Exception:  # a dataset not indexed by 0..n-1: no probe (the pass still checks)
            return None, data
    elif isinstance(data, Tensor) or _looks_like_one_batch(data) or data is None:
        first = data
    elif isinstance(data, Sequence):
        if not data:
            return None, data
        first = data[0]
    else:
        try:
            iterator = iter(data)
        except TypeError:
            return None, data  # iter_batches raises the clear error later
        try:
            first = next(iterator)
        except StopIteration:
            return None, data
        if iterator is data:  # one-shot: hand the taken batch back
            data = _Rechained(first, iterator)
        else:  # re-iterable: the build continues this pass (no extra pass over the data)
            data = _Resumed(data, first, iterator)
    try:
        x, _ = next(iter_batches([first], None, None, need_targets=True))
    except (TypeError, ValueError):
        return None, data  # a malformed batch: the build itself reports it, with its index
    x = _head(x, PROBE_EXAMPLES)
    return (move(x, device, dtype) if batch_size(x) else None), data


class _Rechained:
    """A one-shot iterator with its first item put back (still one-shot)."""

    def __init__(self, first: Any, rest: Iterator[Any]):
        self._items = itertools.chain([first], rest)

    def __iter__(self) -> Iterator[Any]:
        return self  # iter() returns itself, as for any one-shot iterator (see iter_batches)

    def __next__(self) -> Any:
        return next(self._items)


class _Resumed:
    """A re-iterable whose first pass was started to take its first batch: the first ``iter()``
    continues that pass (the taken batch first); later ones start new passes."""

    def __init__(self, data: Any, first: Any, rest: Iterator[Any]):
        self._data = data
        self._pending: Iterator[Any] | None = itertools.chain([first], rest)

    def __iter__(self) -> Iterator[Any]:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)
