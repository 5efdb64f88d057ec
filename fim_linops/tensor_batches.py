r"""Batches of a plain ``DataLoader`` over a ``TensorDataset``, by indexing instead of collating.

``DataLoader(TensorDataset(x, y), batch_size=B)`` fetches every example on its own and stacks them
(``default_collate``): for B = 256 digits that is about 3 ms a batch, more than the forward and
backward of a small MLP. When the loader is exactly that — the stock ``DataLoader`` class, a
``TensorDataset``, the default collate function, no worker processes, no pinned memory — the same
batches come from one ``index_select`` per tensor over the indices the loader's own batch sampler
draws (so shuffling, ``drop_last`` and the sampler's generator behave as they do in the loader),
and the loader's per-iteration draw of a base seed is repeated, so the global random stream after
a pass is the one a plain iteration leaves. Each batch is a fresh tensor, as after collation:
a model that modifies its input in place cannot reach the dataset. Any other loader is iterated
as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset
from torch.utils.data._utils.collate import default_collate


def _is_plain_tensor_loader(data: Any) -> bool:
    """Whether ``data`` is a stock single-process DataLoader over a TensorDataset with the default
    collation (the only case where indexing gives exactly the loader's batches)."""
    if type(data) is not DataLoader or type(data.dataset) is not TensorDataset:
        return False
    if data.num_workers != 0 or data.collate_fn is not default_collate:
        return False
    if data.batch_sampler is None:  # batch_size=None: the loader yields single examples
        return False
    if data.pin_memory:  # the loader would pin the batches (torch.accelerator needs torch 2.6)
        return False
    return all(isinstance(t, Tensor) for t in data.dataset.tensors)


class TensorBatches:
    """Iterable over the batches of a plain ``DataLoader(TensorDataset)`` (see the module doc);
    ``len`` is the loader's number of batches."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.tensors: tuple[Tensor, ...] = loader.dataset.tensors  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        loader = self.loader
        # a DataLoader iterator draws one base seed for its workers from the loader's generator
        # (the global one by default); drawing it here leaves the random state as a pass would
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        sampler = loader.batch_sampler
        if type(sampler) is BatchSampler and type(sampler.sampler) is SequentialSampler:
            n, b = len(sampler.sampler), sampler.batch_size
            stop = n - n % b if sampler.drop_last else n
            for lo in range(0, stop, b):
                hi = min(lo + b, n)
                yield tuple(t[lo:hi].clone() for t in self.tensors)
            return
        assert sampler is not None  # checked by _is_plain_tensor_loader
        for idx in sampler:
            yield tuple(
                t.index_select(0, torch.as_tensor(idx, dtype=torch.long, device=t.device))
                for t in self.tensors
            )


def fast_batches(data: Any) -> Any:
    """``TensorBatches(data)`` for a plain DataLoader over a TensorDataset, else ``data``."""
    return TensorBatches(data) if _is_plain_tensor_loader(data) else data
