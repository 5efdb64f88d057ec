"""Each rank holds its share: ``fl.sharding.fisher_sharded`` on an FSDP2 model, 2 gloo processes
with an uneven half of the data each, gives the single-process Fisher of the unsharded model on
all the data (float64, 1e-10) for diag, kfac and ekfac, through full vectors (products, solves,
logdet, diagonal) and vectors sharded like the parameters; each rank keeps only its own share of
the statistics (asserted on the sizes of the tensors the operator holds). In the same run:
implicit products, the Laplace evidence and influence scores on the sharded model.

All multi-process work is one run of the robust harness (tests/multiproc.py): two ranks, two
models (every Linear sharded; one Linear sharded and the rest plain)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from models import uneven_mlp
from multiproc import run_in_processes
from torch import nn

import fim_linops as fl
from fim_linops.sharding import ShardedFisher, fisher_sharded

pytest.importorskip("torch.distributed.fsdp")

SHARDED = ["diag", "kfac", "ekfac"]
DAMPING = 0.3
MODES = ["fsdp_all", "fsdp_some"]
GATHERS = ["unit", "all"]


def _probes(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    n = sum(p.numel() for p in model.parameters())
    v = torch.linspace(-1, 1, n, dtype=torch.float64)
    return v, torch.stack([v, v.flip(0).sin()], dim=1)


def _query(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:3] * 0.5, (y[:3] + 1) % 3


def _shard(x: torch.Tensor, y: torch.Tensor, rank: int) -> list:
    """Rank 0 reads 5 examples in 2 batches, rank 1 the other 7 in one."""
    return [(x[:3], y[:3]), (x[3:5], y[3:5])] if rank == 0 else [(x[5:], y[5:])]


def _wrap(model: nn.Module, mode: str) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    if mode == "fsdp_all":
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
    else:  # one group, no root: the other layers stay plain (replicated)
        fully_shard(model[2])
    return model


def _local(model: nn.Module) -> list[torch.Tensor]:
    return [getattr(p, "_local_tensor", p).detach().clone() for p in model.parameters()]


def _gathered_at_once(model: nn.Module, data: list, gather: str) -> list[int]:
    """At each forward of the build's data pass (the first-batch checks' side forwards excluded:
    with gather="unit" they run on the gathered model), the number of Linear layers whose
    parameters are full tensors rather than DTensor shards."""
    from fim_linops.sharding import gather as gather_mod

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    seen: list[int] = []

    def hook(module: nn.Module, args: tuple) -> None:
        if gather == "unit" and gather_mod._ACTIVE:  # the checks' side forwards
            return
        seen.append(sum(not hasattr(m.weight, "_local_tensor") for m in linears))

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        fisher_sharded(model, data, structure="kfac", gather=gather)
    finally:
        for h in handles:
            h.remove()
    return seen


def _operator_results(F: ShardedFisher, v: torch.Tensor, V: torch.Tensor) -> dict:
    D = F.add_diagonal(DAMPING)
    return {
        "F@v": F @ v,
        "F@V": F @ V,
        "diag": F.diagonal(),
        "solve": D.solve(V),
        "logdet": D.logdet().reshape(1),
        "trace": fl.trace(F).reshape(1),
        "root": D.root_decomposition().root @ v,
        "sharded F@v": F.matmul_sharded(F.shard(v)),
        "sharded F@V": F.matmul_sharded(F.shard(V)),
        "sharded solve": D.solve_sharded(F.shard(v)),
        "shard of v": F.shard(v),
        "unshard": F.unshard(F.shard(V)),
        "held": torch.tensor([F.held_numel()]),
    }


def _uneven_backward_passes(model: nn.Module, data: list, V: torch.Tensor, rank: int) -> dict:
    """The exact Fisher's columns back-propagated one per pass on rank 0 and all at once on rank
    1: in the per-unit pass each backward is a collective (FSDP re-gathers the units), so the
    ranks must agree on the number of passes per forward (else they deadlock)."""
    from fim_linops.engine import engine as engine_mod

    plain_step = engine_mod.column_step
    steps: list[int] = []

    def step(*args, **kwargs) -> int:
        steps.append(1 if rank == 0 else plain_step(*args, **kwargs))
        return steps[-1]

    out: dict = {}
    engine_mod.column_step = step
    try:
        for s in SHARDED:
            out[f"uneven passes {s} F@V"] = fisher_sharded(model, data, structure=s) @ V
    finally:
        engine_mod.column_step = plain_step
    out["uneven passes steps"] = steps
    return out


def _worker(rank: int, world: int) -> dict:
    out: dict = {}
    for mode in MODES:
        plain, x, y = uneven_mlp()
        v, V = _probes(plain)
        model = _wrap(copy.deepcopy(plain), mode)
        before = _local(model)
        data = _shard(x, y, rank)
        for s in SHARDED:
            for gather in GATHERS:
                F = fisher_sharded(model, data, structure=s, gather=gather)
                for key, val in _operator_results(F, v, V).items():
                    out[f"{mode} {gather} {s} {key}"] = val
                out[f"{mode} {gather} {s} pass held"] = F.pass_held
        mc = {}  # MC labels: the stand-in batch (rank 1) draws after the real ones
        for gather in GATHERS:
            gen = torch.Generator().manual_seed(3)
            S = fisher_sharded(model, data, structure="ekfac", fisher_type="mc", generator=gen)
            mc[gather] = S @ V
        out[f"{mode} mc ekfac unit - all"] = mc["unit"] - mc["all"]
        if mode == "fsdp_all":
            out.update(_uneven_backward_passes(model, data, V, rank))
        # rank 0's first batch has one example: its first-batch checks run fewer side forwards
        skew = [(x[:1], y[:1]), (x[1:5], y[1:5])] if rank == 0 else [(x[5:], y[5:])]
        out[f"{mode} skewed kfac F@V"] = fisher_sharded(model, skew, structure="kfac") @ V
        try:
            fisher_sharded(model, data if rank == 0 else [], structure="diag")
            out[f"{mode} no data error"] = ""
        except ValueError as e:
            out[f"{mode} no data error"] = str(e)
        for gather in GATHERS:  # how many Linear layers hold full parameters at each forward
            out[f"{mode} {gather} gathered at once"] = _gathered_at_once(model, data, gather)
        out[f"{mode} shards unchanged"] = all(
            torch.equal(a, b) for a, b in zip(before, _local(model), strict=True)
        )
        if mode != "fsdp_all":  # Laplace and influence once (the fast part of the run)
            continue
        F = fl.fisher(model, data, structure="implicit")
        out[f"{mode} implicit F@V"] = F @ V
        for s in ("kfac", "ekfac", "diag"):
            la = fl.laplace.Laplace(model, data, structure=s, prior_precision=0.5)
            out[f"{mode} laplace {s} lml"] = la.log_marginal_likelihood().reshape(1)
        q = _query(x, y)
        out[f"{mode} influence ekfac"] = fl.influence(model, data, q, structure="ekfac")
        out[f"{mode} self_influence kfac"] = fl.self_influence(model, data, structure="kfac")
        for s in SHARDED:  # the posterior over the sharded GGN: each rank its share
            la = fl.laplace.Laplace(model, data, structure=s, prior_precision=0.5, sharded=True)
            out[f"{mode} laplace sharded {s} lml"] = la.log_marginal_likelihood().reshape(1)
            out[f"{mode} laplace sharded {s} predictive"] = la.predictive(q[0])[1]
            out[f"{mode} laplace sharded {s} held"] = torch.tensor([la.ggn.held_numel()])
            gen = torch.Generator().manual_seed(0)
            out[f"{mode} laplace sharded {s} sample"] = la.sample(3, generator=gen)
            la.optimize_prior_precision(n_steps=3)
            out[f"{mode} laplace sharded {s} tuned"] = la.prior_precision.reshape(1)
        S = fisher_sharded(model, data, structure="kfac")
        out[f"{mode} to float32 F@v"] = S.to(torch.float32) @ v.float()
        out[f"{mode} to cpu float64 F@v"] = S.to("cpu", torch.float64) @ v
        try:
            pickle.dumps(S)
            out[f"{mode} pickle error"] = ""
        except TypeError as e:
            out[f"{mode} pickle error"] = str(e)
        out[f"{mode} influence sharded diag"] = fl.influence(
            model, data, q, structure=fisher_sharded(model, data, structure="diag")
        )
        S = fisher_sharded(model, data, structure="ekfac")
        out[f"{mode} influence sharded ekfac"] = fl.influence(model, data, q, structure=S)
        out[f"{mode} top sharded ekfac"] = fl.top_influences(model, data, q, k=2, structure=S)[0]
        out[f"{mode} shards still unchanged"] = all(
            torch.equal(a, b) for a, b in zip(before, _local(model), strict=True)
        )
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_in_processes(_worker, world_size=2, timeout=180.0)


@pytest.fixture(scope="module")
def want() -> dict:
    """The same quantities on one process: the unsharded model on all the data."""
    plain, x, y = uneven_mlp()
    v, V = _probes(plain)
    want: dict = {}
    for s in SHARDED:
        F = fl.fisher(plain, (x, y), structure=s)
        D = F.add_diagonal(DAMPING)
        want[f"{s} F@v"], want[f"{s} F@V"], want[f"{s} diag"] = F @ v, F @ V, F.diagonal()
        want[f"{s} solve"], want[f"{s} logdet"] = D.solve(V), D.logdet().reshape(1)
        want[f"{s} trace"] = fl.trace(F).reshape(1)
        want[f"{s} root"] = D.root_decomposition().root @ v
        want[f"{s} unshard"] = V
        want[f"{s} held"] = sum(t.numel() for t in F._args)  # all of F, for the shares
        want[f"{s} full sharded F@v"], want[f"{s} full sharded F@V"] = F @ v, F @ V
        want[f"{s} full sharded solve"] = D.solve(v)
    want["implicit F@V"] = fl.fisher(plain, (x, y), structure="implicit") @ V
    for s in ("kfac", "ekfac", "diag"):
        la = fl.laplace.Laplace(plain, (x, y), structure=s, prior_precision=0.5)
        want[f"laplace {s} lml"] = la.log_marginal_likelihood().reshape(1)
    q = _query(x, y)
    for s in SHARDED:
        la = fl.laplace.Laplace(plain, (x, y), structure=s, prior_precision=0.5)
        want[f"laplace sharded {s} lml"] = la.log_marginal_likelihood().reshape(1)
        want[f"laplace sharded {s} predictive"] = la.predictive(q[0])[1]
        want[f"laplace sharded {s} held"] = sum(t.numel() for t in la.ggn._args)
        la.optimize_prior_precision(n_steps=3)
        want[f"laplace sharded {s} tuned"] = la.prior_precision.reshape(1)
    want["influence diag"] = fl.influence(plain, (x, y), q, structure="diag")
    want["influence ekfac"] = fl.influence(plain, (x, y), q, structure="ekfac")
    want["self_influence kfac"] = fl.self_influence(plain, (x, y), structure="kfac")
    return want


def _close(got, want, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=what)


@pytest.mark.parametrize("gather", GATHERS)
@pytest.mark.parametrize("mode", MODES)
def test_sharded_operators_equal_the_unsharded_fisher_on_all_the_data(
    ranks, want, mode, gather
) -> None:
    plain, _, _ = uneven_mlp()
    v, V = _probes(plain)
    for rank, got in enumerate(ranks):
        assert got[f"{mode} shards unchanged"], rank
        for s in SHARDED:
            for key in ("F@v", "F@V", "diag", "solve", "logdet", "trace", "root", "unshard"):
                _close(
                    got[f"{mode} {gather} {s} {key}"],
                    want[f"{s} {key}"],
                    f"{mode} {gather} {s} {key} r{rank}",
                )
            # sharded vectors: this rank's entries of the full results
            shard_v = got[f"{mode} {gather} {s} shard of v"]
            idx = torch.cat([torch.arange(lo, hi) for lo, hi in _param_ranges(plain, rank)])
            _close(shard_v, v[idx], f"{mode} {gather} {s} shard r{rank}")
            for key in ("sharded F@v", "sharded F@V", "sharded solve"):
                w = want[f"{s} full {key}"][idx]
                _close(got[f"{mode} {gather} {s} {key}"], w, f"{mode} {gather} {s} {key} r{rank}")


def _param_ranges(model: nn.Module, rank: int, world: int = 2) -> list[tuple[int, int]]:
    """torch.chunk's dim-0 split, written out independently of fim_linops.sharding.shards."""
    out, start = [], 0
    for p in model.parameters():
        rows = list(torch.arange(p.shape[0]).chunk(world))
        row = p.numel() // p.shape[0]
        if rank < len(rows) and len(rows[rank]):
            out.append((start + int(rows[rank][0]) * row, start + (int(rows[rank][-1]) + 1) * row))
        start += p.numel()
    return out


@pytest.mark.parametrize("mode", MODES)
def test_each_rank_keeps_only_its_share_of_the_statistics(ranks, want, mode) -> None:
    plain, _, _ = uneven_mlp()
    for s in SHARDED:
        held = [int(r[f"{mode} unit {s} held"]) for r in ranks]
        total = want[f"{s} held"]
        assert sum(held) == total, (s, held, total)  # together exactly the unsharded statistics
        assert all(0 < h < total for h in held), (s, held, total)  # each rank only a part
    # diag: exactly the entries of the rank's own FSDP shards (4 + 3 rows, 2 + 1 rows ...)
    for rank, r in enumerate(ranks):
        mine = sum(hi - lo for lo, hi in _param_ranges(plain, rank))
        assert int(r[f"{mode} unit diag held"]) == mine


def test_ranks_whose_batches_need_different_numbers_of_backward_passes(ranks, want) -> None:
    assert set(ranks[0]["uneven passes steps"]) == {1}
    assert min(ranks[1]["uneven passes steps"]) > 1  # all 3 columns in one pass
    for rank, got in enumerate(ranks):
        for s in SHARDED:
            _close(got[f"uneven passes {s} F@V"], want[f"{s} F@V"], f"uneven passes {s} r{rank}")


@pytest.mark.parametrize("gather", GATHERS)
def test_statistics_are_reduced_to_their_owners_during_the_pass(ranks, want, gather) -> None:
    """At no time of the pass does a rank hold the whole statistics: its share as it grows plus
    one layer's contribution of one result (EKFAC: plus every layer's eigenbases, which each rank
    needs to project its own data), not every layer's partial sums until one reduction at the
    end (which held the full statistics plus the share)."""
    plain, _, _ = uneven_mlp()
    linears = [m for m in plain if isinstance(m, nn.Linear)]
    largest = max(m.weight.numel() + m.bias.numel() for m in linears)  # 7 x 5 + 7
    # Kronecker factors of a Linear: G (out, out) and A (in + 1, in + 1)
    factors = [m.out_features**2 + (m.in_features + 1) ** 2 for m in linears]
    bases = sum(factors)
    for mode in MODES:
        for rank, got in enumerate(ranks):
            what = (mode, gather, rank)
            share = {s: int(got[f"{mode} {gather} {s} held"]) for s in SHARDED}
            held = {s: got[f"{mode} {gather} {s} pass held"] for s in SHARDED}
            assert held["diag"] == share["diag"] + largest, what
            assert held["diag"] < want["diag held"] + share["diag"], what
            assert held["kfac"] == share["kfac"] + max(factors), what
            assert held["kfac"] < want["kfac held"] + share["kfac"], what
            # EKFAC: the first pass as KFAC's; the second holds the owned eigenvalue sums (a
            # Linear's rows x cols = its parameter count), one layer's, and all the bases
            owned_sums = share["ekfac"] - share["kfac"]  # its share: owned bases + sums
            second = owned_sums + largest + bases
            assert held["ekfac"] == max(share["kfac"] + max(factors), second), what


def test_the_unit_pass_gathers_one_fsdp_unit_at_a_time(ranks, want) -> None:
    # fsdp_all: each Linear is its own unit; gather="all" holds all three for the whole pass,
    # gather="unit" at most two (the running unit and the one FSDP prefetches); fsdp_some: the
    # one sharded Linear is gathered for its own forward only, the plain ones are always full
    for rank, got in enumerate(ranks):
        for mode, most in (("fsdp_all", 2), ("fsdp_some", 3)):
            unit, full = got[f"{mode} unit gathered at once"], got[f"{mode} all gathered at once"]
            assert unit and full and set(full) == {3}, (rank, mode, full)
            assert max(unit) <= most, (rank, mode, unit)
        assert min(got["fsdp_all unit gathered at once"]) == 1, rank
        for mode in MODES:
            assert float(got[f"{mode} mc ekfac unit - all"].abs().max()) == 0.0, (rank, mode)
            _close(got[f"{mode} skewed kfac F@V"], want["kfac F@V"], f"{mode} skewed r{rank}")
            err = got[f"{mode} no data error"]
            assert ("a rank has no batch" if rank == 0 else "data is empty") in err, (rank, err)
        assert min(got["fsdp_some unit gathered at once"]) == 2, rank


def test_laplace_and_influence_on_the_sharded_model(ranks, want) -> None:
    mode = "fsdp_all"
    cols = [slice(0, 5), slice(5, 12)]  # each rank scores its own training examples
    for rank, got in enumerate(ranks):
        assert got[f"{mode} shards still unchanged"], rank
        for s in ("kfac", "ekfac", "diag"):
            key = f"laplace {s} lml"
            _close(got[f"{mode} {key}"], want[key], f"{mode} {key} r{rank}")
        _close(got[f"{mode} implicit F@V"], want["implicit F@V"], f"{mode} implicit r{rank}")
        inf = want["influence ekfac"][:, cols[rank]]
        _close(got[f"{mode} influence ekfac"], inf, f"{mode} influence r{rank}")
        _close(got[f"{mode} influence sharded ekfac"], inf, f"{mode} sharded influence r{rank}")
        inf_d = want["influence diag"][:, cols[rank]]
        _close(got[f"{mode} influence sharded diag"], inf_d, f"{mode} sharded diag infl r{rank}")
        top = inf.topk(2, dim=1).values
        _close(got[f"{mode} top sharded ekfac"], top, f"{mode} top r{rank}")
        si = want["self_influence kfac"][cols[rank]]
        _close(got[f"{mode} self_influence kfac"], si, f"{mode} self_influence r{rank}")


def test_sharded_laplace_equals_the_unsharded_posterior_and_holds_a_share(ranks, want) -> None:
    mode = "fsdp_all"
    for s in SHARDED:
        held = [int(r[f"{mode} laplace sharded {s} held"]) for r in ranks]
        total = want[f"laplace sharded {s} held"]
        assert sum(held) == total and all(0 < h < total for h in held), (s, held, total)
        for rank, got in enumerate(ranks):
            for key in ("lml", "predictive", "tuned"):
                k = f"laplace sharded {s} {key}"
                _close(got[f"{mode} {k}"], want[k], f"{k} r{rank}")
        samples = [r[f"{mode} laplace sharded {s} sample"] for r in ranks]
        assert samples[0].shape == (3, want["kfac F@v"].shape[0]), s
        assert bool(samples[0].isfinite().all()) and torch.equal(samples[0], samples[1]), s


def test_sharded_fisher_moves_with_to_and_refuses_pickling_with_a_group(ranks, want) -> None:
    mode = "fsdp_all"
    for rank, got in enumerate(ranks):
        _close(got[f"{mode} to cpu float64 F@v"], want["kfac F@v"], f"to cpu r{rank}")
        f32 = got[f"{mode} to float32 F@v"]
        assert f32.dtype == torch.float32
        torch.testing.assert_close(f32, want["kfac F@v"].float(), rtol=1e-5, atol=1e-6)
        assert "cannot pickle a ShardedFisher of 2 ranks" in got[f"{mode} pickle error"], rank


# -- one process: the same function on a plain model, and its errors ---------------------------


@pytest.mark.parametrize("structure", SHARDED)
def test_one_process_sharded_build_is_the_plain_operator(structure) -> None:
    plain, x, y = uneven_mlp()
    v, V = _probes(plain)
    F = fl.fisher(plain, (x, y), structure=structure)
    S = fisher_sharded(plain, (x, y), structure=structure)
    _close(S @ V, F @ V, "F@V")
    _close(S.matmul_sharded(V), F @ V, "sharded = full on one process")
    back = pickle.loads(pickle.dumps(S))  # one process: no group, so it pickles
    _close(back @ V, F @ V, "unpickled")
    _close((S * 3.0) @ V, (F * 3.0) @ V, "scaled")
    assert S.held_numel() == sum(t.numel() for t in F._args)


def test_unsupported_structure_and_layers_raise_clear_errors() -> None:
    plain, x, y = uneven_mlp()
    with pytest.raises(ValueError, match="structure='diag', 'kfac' or 'ekfac'"):
        fisher_sharded(plain, (x, y), structure="block_diag")
    normed = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="needs Kronecker factors for every layer.*'1'"):
        fisher_sharded(normed, (x, y), structure="kfac")
    with pytest.raises(ValueError, match="not a per-layer mix.*params="):
        fisher_sharded(plain, (x, y), structure={nn.Linear: "kfac"})
    with pytest.raises(ValueError, match="sharded=True.*'diag', 'kfac' or 'ekfac'"):
        fl.laplace.Laplace(plain, (x, y), structure="dense", sharded=True)
    with pytest.raises(ValueError, match="sharded Laplace .* scalar prior precision"):
        fl.laplace.Laplace(
            plain, (x, y), structure="kfac", prior_precision=torch.ones(3), sharded=True
        )
    S = fisher_sharded(plain, (x, y), structure="kfac")
    with pytest.raises(ValueError, match="self_influence .* ShardedFisher"):
        fl.self_influence(plain, (x, y), structure=S)
