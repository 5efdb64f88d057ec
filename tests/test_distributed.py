"""Two processes (gloo), each with half of the data, give the single-process Fisher on all of it;
and the multi-process harness (tests/multiproc.py) reports worker failures and survives the
teardown abort of torch's gloo process group."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from multiproc import WorkerError, run_in_processes
from torch import nn

import fim_linops as fl

STRUCTURES = ["diag", "kfac", "ekfac", "dense", "block_diag", "implicit"]


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4)
    ).double()
    x = torch.randn(12, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    return model, x, y


def _results(model, batches, v):
    out = {}
    for s in STRUCTURES:
        F = fl.fisher(model, batches, structure=s)
        out[s] = (F @ v, F.diagonal())
    la = fl.laplace.Laplace(model, batches, structure="kfac", prior_precision=0.5)
    out["laplace"] = (la.log_marginal_likelihood().reshape(1), la.posterior_precision @ v)
    return out


def _worker(rank: int, world: int) -> dict:
    model, x, y = _setup()
    # uneven shards: rank 0 reads 5 examples in 2 batches, rank 1 reads 7 in one
    shard = [(x[:3], y[:3]), (x[3:5], y[3:5])] if rank == 0 else [(x[5:], y[5:])]
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    return _results(model, shard, v)


def test_two_processes_with_half_the_data_each_equal_one_process_on_all() -> None:
    got = run_in_processes(_worker, world_size=2)
    model, x, y = _setup()
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    want = _results(model, [(x, y)], v)
    for rank in range(2):  # every rank holds the reduced operator
        for s in [*STRUCTURES, "laplace"]:
            for a, b in zip(got[rank][s], want[s], strict=True):
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), (rank, s)


def _iterative(model, batches) -> dict[str, torch.Tensor]:
    """kron_sum (one data pass per iteration, each all-reduced) and lowrank by both routes."""
    from fim_linops.builders import lowrank

    out = {}
    for r in (1, 2):
        out[f"kron_sum{r}"] = fl.fisher(model, batches, structure="kron_sum", rank=r).to_dense()
    out["lowrank_svd"] = fl.fisher(model, batches, structure="lowrank", rank=3).to_dense()
    old = lowrank.SVD_MAX_BYTES
    lowrank.SVD_MAX_BYTES = 0  # the Lanczos route on implicit products
    try:
        out["lowrank_lanczos"] = fl.fisher(model, batches, structure="lowrank", rank=3).to_dense()
    finally:
        lowrank.SVD_MAX_BYTES = old
    return out


def _iterative_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    model, x, y = _setup()
    shard = [(x[:3], y[:3]), (x[3:5], y[3:5])] if rank == 0 else [(x[5:], y[5:])]
    if rank == 1:  # a different global RNG state: the Lanczos start must still be rank 0's
        torch.manual_seed(123)
    return _iterative(model, shard)


def test_kron_sum_and_lowrank_reduce_every_pass_across_two_processes() -> None:
    got = run_in_processes(_iterative_worker, world_size=2)
    model, x, y = _setup()
    want = _iterative(model, [(x, y)])
    for rank in range(2):
        for s, w in want.items():
            torch.testing.assert_close(got[rank][s], w, rtol=1e-10, atol=1e-13, msg=(rank, s))


# -- the harness itself ------------------------------------------------------------------------------
def _rank_sum(rank: int, world: int, mode: str) -> torch.Tensor:
    t = torch.full((2,), float(rank + 1))
    dist.all_reduce(t)
    if mode == "raise" and rank == 1:
        raise ArithmeticError("rank 1 found a wrong number")
    if mode == "die" and rank == 1:
        os.abort()  # dies before it reports: a real failure
    return t


def test_harness_returns_every_ranks_result_in_rank_order() -> None:
    # torch's own teardown runs after the report: it may abort, which must not matter
    got = run_in_processes(
        _rank_sum, args=("ok",), world_size=2, after_report=dist.destroy_process_group
    )
    assert len(got) == 2 and all(torch.equal(t, torch.full((2,), 3.0)) for t in got)


def test_a_worker_exception_fails_the_run_with_its_traceback() -> None:
    with pytest.raises(WorkerError, match="(?s)rank 1 raised.*ArithmeticError: rank 1 found"):
        run_in_processes(_rank_sum, args=("raise",), world_size=2, timeout=120)


def test_a_worker_that_dies_before_reporting_fails_the_run() -> None:
    with pytest.raises(WorkerError, match="rank 1 did not report \\(killed by signal SIGABRT\\)"):
        run_in_processes(_rank_sum, args=("die",), world_size=2, timeout=120)


def test_an_abort_after_the_report_does_not_fail_the_run() -> None:
    """What torch 2.13's gloo teardown does now and then: SIGABRT once the work is done."""
    assert run_in_processes(_rank_sum, args=("ok",), after_report=os.abort)[1].sum() == 6.0
