"""Two processes (gloo, localhost), each with half of the data, give the single-process Fisher on
all of it."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, y = _setup()
        # uneven shards: rank 0 reads 5 examples in 2 batches, rank 1 reads 7 in one
        shard = [(x[:3], y[:3]), (x[3:5], y[3:5])] if rank == 0 else [(x[5:], y[5:])]
        v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        res = _results(model, shard, v)
        if rank == 0:
            torch.save(res, path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_half_the_data_each_equal_one_process_on_all(tmp_path) -> None:
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    got = torch.load(path, weights_only=False)
    model, x, y = _setup()
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    want = _results(model, [(x, y)], v)
    for s in [*STRUCTURES, "laplace"]:
        for a, b in zip(got[s], want[s], strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), s
