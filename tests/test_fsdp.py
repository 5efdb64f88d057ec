"""Models sharded with FSDP2 (``fully_shard``: DTensor parameter shards) or wrapped in
DistributedDataParallel, on 2 gloo processes with half of the data each, give the single-process
Fisher, Laplace evidence and products of the unsharded model on all the data (float64, 1e-10),
and are left as found (shards, a training step).

Harness: gloo process-group teardown on this torch aborts in about one run of three
(``terminate called without an active exception``) after the work is done. Each worker writes its
results (or its traceback) to a file *before* teardown; the parent judges by the files, not by the
exit codes."""

from __future__ import annotations

import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    # odd sizes: FSDP's dim-0 shards are uneven (7 rows -> 4 + 3, 3 rows -> 2 + 1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 3)
    ).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return model, x, y


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


def _worker(rank: int, port: int, mode: str, folder: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        plain, x, y = _setup()
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
        _save(res, folder, rank)
    except BaseException:
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _save(res: dict, folder: str, rank: int) -> None:
    tmp = os.path.join(folder, f"rank{rank}.tmp")
    torch.save(res, tmp)
    os.replace(tmp, os.path.join(folder, f"rank{rank}.pt"))  # atomic: complete or absent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(mode: str, folder: str) -> list[dict]:
    """Spawn the ranks; their results from the files (teardown aborts after them are ignored)."""
    ctx = mp.start_processes(
        _worker, args=(_free_port(), mode, folder), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    for p in ctx.processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [
        open(os.path.join(folder, f"rank{r}.err")).read()
        for r in range(WORLD)
        if os.path.exists(os.path.join(folder, f"rank{r}.err"))
    ]
    assert not errors, "\n".join(errors)
    paths = [os.path.join(folder, f"rank{r}.pt") for r in range(WORLD)]
    missing = [p for p in paths if not os.path.exists(p)]
    assert not missing, (
        f"no results from {missing} (exit codes {[p.exitcode for p in ctx.processes]})"
    )
    return [torch.load(p, weights_only=False) for p in paths]


@pytest.mark.parametrize("mode", ["fsdp_all", "fsdp_some", "ddp"])
def test_sharded_model_on_half_the_data_each_equals_one_process_on_all(mode, tmp_path) -> None:
    got = run_ranks(mode, str(tmp_path))
    plain, x, y = _setup()
    want = _results(plain, [(x, y)], _probe(plain))
    want["forward after"] = plain(x).detach()
    for rank, res in enumerate(got):
        assert res["shards unchanged"].item() == 1.0, rank
        if mode.startswith("fsdp"):
            assert res["still DTensor"].item() == 1.0 or mode == "fsdp_some", rank
        for key, w in want.items():
            torch.testing.assert_close(res[key], w, rtol=1e-10, atol=1e-13, msg=f"{mode} {key}")
