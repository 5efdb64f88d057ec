"""Models sharded with FSDP2 (``fully_shard``: DTensor parameter shards) or wrapped in
DistributedDataParallel, on 2 gloo processes with half of the data each, give the single-process
Fisher, Laplace evidence and products of the unsharded model on all the data (float64, 1e-10),
and are left as found (shards, a training step).

Harness: tests/multiproc.py (gloo process-group teardown on this torch aborts in about one run of
three, ``terminate called without an active exception``, after the work is done; the workers
report their results to files before any teardown and leave with ``os._exit(0)``)."""

from __future__ import annotations

import pytest
import torch
from models import uneven_mlp
from multiproc import run_in_processes
from torch import nn

import fim_linops as fl

fsdp = pytest.importorskip("torch.distributed.fsdp")

STRUCTURES: list = [
    "diag",
    "kfac",
    "ekfac",
    "kron_sum",
    "implicit",
    "block_diag",
    {nn.Linear: "kfac", "default": "diag"},
    {"0": "implicit", "default": "ekfac"},
]
WORLD = 2
TIMEOUT_S = 120.0


def _probe(model: nn.Module) -> torch.Tensor:
    n = sum(p.numel() for p in model.parameters())
    return torch.linspace(-1, 1, n, dtype=torch.float64)


def _results(model: nn.Module, batches: list, v: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, s in enumerate(STRUCTURES):
        F = fl.fisher(model, batches, structure=s, rank=2 if s == "kron_sum" else None)
        out[f"{i}:{s} F@v"] = F @ v
        out[f"{i}:{s} diag"] = F.diagonal()
        out[f"{i}:{s} F@V"] = F @ torch.stack([v, v.flip(0)], dim=1)
    la = fl.laplace.Laplace(model, batches, structure="kfac", prior_precision=0.5)
    out["laplace lml"] = la.log_marginal_likelihood().reshape(1)
    out["laplace precision@v"] = la.posterior_precision @ v
    mean, var = la.predictive(torch.linspace(-1, 1, 10, dtype=torch.float64).reshape(2, 5))
    out["laplace predictive mean"], out["laplace predictive var"] = mean, var
    return out


def _wrap(model: nn.Module, mode: str) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    if mode == "fsdp_all":  # every Linear its own group, the rest with the root
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
    elif mode == "fsdp_some":  # one group, no root: the other layers stay plain
        fully_shard(model[2])
    elif mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    return model


def _local(model: nn.Module) -> list[torch.Tensor]:
    return [getattr(p, "_local_tensor", p).detach().clone() for p in model.parameters()]


def _worker(rank: int, world: int, mode: str) -> dict[str, torch.Tensor]:
    plain, x, y = uneven_mlp()
    v = _probe(plain)
    model = _wrap(plain, mode)
    before = _local(model)
    # uneven data shards: rank 0 reads 5 examples in 2 batches, rank 1 reads 7 in one
    shard = [(x[:3], y[:3]), (x[3:5], y[3:5])] if rank == 0 else [(x[5:], y[5:])]
    res = _results(model, shard, v)
    after = _local(model)
    res["shards unchanged"] = torch.tensor(
        [float(all(torch.equal(a, b) for a, b in zip(before, after, strict=True)))]
    )
    types = {type(p).__name__ for p in model.parameters()}
    res["still DTensor"] = torch.tensor([float(types == {"DTensor"})])
    res["forward after"] = model(x).detach()  # the model still runs as FSDP/DDP
    model(x).sum().backward()  # and trains
    return res


def run_ranks(mode: str) -> list[dict]:
    """Run the ranks through tests/multiproc.py: results are judged by what each rank reports
    before teardown (a teardown abort after the report is ignored; a rank that raises, dies before
    reporting or times out fails the test with its traceback or log)."""
    return run_in_processes(_worker, args=(mode,), world_size=WORLD, timeout=TIMEOUT_S)


@pytest.mark.parametrize("mode", ["fsdp_all", "fsdp_some", "ddp"])
def test_sharded_model_on_half_the_data_each_equals_one_process_on_all(mode) -> None:
    got = run_ranks(mode)
    plain, x, y = uneven_mlp()
    want = _results(plain, [(x, y)], _probe(plain))
    want["forward after"] = plain(x).detach()
    for rank, res in enumerate(got):
        assert res["shards unchanged"].item() == 1.0, rank
        if mode.startswith("fsdp"):
            assert res["still DTensor"].item() == 1.0 or mode == "fsdp_some", rank
        for key, w in want.items():
            torch.testing.assert_close(res[key], w, rtol=1e-10, atol=1e-13, msg=f"{mode} {key}")
