"""The DataLoader(TensorDataset) fast path yields exactly the loader's batches and leaves the random
state as a plain pass over the loader would."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fim_linops as fl
from fim_linops.data import iter_batches
from fim_linops.tensor_batches import TensorBatches, fast_batches


def _data(n: int = 23) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 2, generator=g), torch.randint(0, 4, (n,), generator=g))


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for ba, bb in zip(a, b, strict=True):
        assert len(ba) == len(bb)
        for ta, tb in zip(ba, bb, strict=True):
            assert ta.dtype == tb.dtype and ta.shape == tb.shape
            assert torch.equal(ta, tb)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_same_batches_and_random_state(shuffle: bool, drop_last: bool) -> None:
    ds = _data()
    loader = DataLoader(ds, batch_size=5, shuffle=shuffle, drop_last=drop_last)
    fast = fast_batches(loader)
    assert isinstance(fast, TensorBatches) and len(fast) == len(loader)
    torch.manual_seed(1)
    ref = [tuple(b) for b in loader]
    after_ref = torch.rand(3)
    torch.manual_seed(1)
    got = list(fast)
    after_got = torch.rand(3)
    _same(got, ref)
    assert torch.equal(after_ref, after_got)  # the same draws from the global generator


def test_loader_generator_is_used() -> None:
    ds = _data()
    ref = [
        tuple(b)
        for b in DataLoader(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(3))
    ]
    got = list(
        fast_batches(DataLoader(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    )
    _same(got, ref)


def test_batches_are_copies() -> None:
    ds = _data()
    x0 = ds.tensors[0].clone()
    for x, _ in fast_batches(DataLoader(ds, batch_size=7)):
        x.mul_(0)  # a model that rewrites its input in place
    assert torch.equal(ds.tensors[0], x0)


def test_other_loaders_untouched() -> None:
    ds = _data()

    class MyLoader(DataLoader):
        pass

    for loader in (
        DataLoader(ds, batch_size=4, collate_fn=lambda b: b),
        DataLoader(ds, batch_size=None),
        MyLoader(ds, batch_size=4),
        DataLoader(torch.utils.data.Subset(ds, range(5)), batch_size=2),
    ):
        assert fast_batches(loader) is loader


def test_fisher_same_on_fast_and_plain_path() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    ds = _data(40)
    ds = TensorDataset(ds.tensors[0].reshape(40, 6), ds.tensors[1])
    plain = [tuple(b) for b in DataLoader(ds, batch_size=16)]  # a list: not the fast path
    loader = DataLoader(ds, batch_size=16)
    assert isinstance(fast_batches(loader), TensorBatches)
    for structure in ("diag", "kfac"):
        a = fl.fisher(model, loader, "categorical", structure=structure).to_dense()
        b = fl.fisher(model, plain, "categorical", structure=structure).to_dense()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_iter_batches_uses_fast_path_and_moves_dtype() -> None:
    ds = _data()
    out = list(iter_batches(DataLoader(ds, batch_size=10), None, torch.float64))
    assert [x.shape[0] for x, _ in out] == [10, 10, 3]
    assert all(x.dtype == torch.float64 and y.dtype == torch.long for x, y in out)
