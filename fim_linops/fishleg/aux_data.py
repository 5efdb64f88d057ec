"""FishLeg's auxiliary batches: one fixed batch, or an iterable / DataLoader of batches cycled
forever, with its position kept for ``state_dict`` resumption."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from fim_linops.data import split_mapping


def is_one_batch(data: Any) -> bool:
    """(x, y) with a tensor y, a bare tensor x or a mapping batch (Hugging Face): one batch;
    anything else iterable: batches."""
    if isinstance(data, (Tensor, Mapping)):
        return True
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def inputs_of(batch: Any, model: Any = None) -> tuple[Any, Tensor | None]:
    """The model input of a batch and its labels, if any: x of (x, y), the keys but ``labels`` of
    a mapping (with an encoder-decoder ``model``'s decoder inputs:
    :func:`~fim_linops.data.split_mapping`). The labels are read only for the kept positions
    (ignore_index); the Fisher uses p(y|x)."""
    if isinstance(batch, Mapping):
        return split_mapping(batch, model)
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and not isinstance(batch, Tensor):
        y = batch[1] if len(batch) == 2 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    return batch, None


class AuxData:
    """The inputs x of the auxiliary batches, in turn: ``next()`` draws one, ``last`` is the latest
    (drawn on first use) and ``last_labels`` its labels (None without), ``drawn`` counts the
    batches taken from an iterable."""

    def __init__(self, data: Any, model: Any = None):
        self.data, self.model = data, model
        self._iter: Iterator | None = None
        self.drawn = 0
        self._last: Any = None
        self.last_labels: Tensor | None = None

    def next(self) -> Any:
        if is_one_batch(self.data):
            self._last, self.last_labels = inputs_of(self.data, self.model)
            return self._last
        if self._iter is None:
            self._iter = iter(self.data)
        try:
            batch = next(self._iter)
        except StopIteration:
            self._iter = iter(self.data)
            try:
                batch = next(self._iter)
            except StopIteration:
                raise ValueError(
                    "aux_data is empty: give FishLeg at least one (x, y) batch"
                ) from None
        self.drawn += 1
        self._last, self.last_labels = inputs_of(batch, self.model)
        return self._last

    @property
    def last(self) -> Any:
        return self._last if self._last is not None else self.next()

    def restore(self, drawn: int) -> None:
        """Start again and fast-forward an iterable past ``drawn`` batches (the same batches again
        if its order is deterministic); the next auxiliary batch is drawn afresh."""
        self.drawn, self._iter, self._last, self.last_labels = 0, None, None, None
        if is_one_batch(self.data) or not drawn:
            return
        n = int(drawn)
        if hasattr(self.data, "__len__") and len(self.data) > 0:
            n %= len(self.data)
        self._iter = iter(self.data)
        for _ in itertools.islice(self._iter, n):
            pass
        self.drawn = int(drawn)
