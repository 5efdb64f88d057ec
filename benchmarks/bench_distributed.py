r"""Per-rank time and memory of the diagonal and KFAC Fisher of a character transformer on 1 and
2 processes (gloo, CPU), replicated (``fl.fisher``) against sharded
(``fl.sharding.fisher_sharded``: each rank keeps its share).

Model: ``fim_linops.examples.nanogpt.NanoGPT`` (untied embedding and head, so every Kronecker
layer is its own), the Fisher over its Linear and Embedding parameters (``params=``: LayerNorm
has no Kronecker factors, and ``fisher_sharded(structure="kfac")`` asks for factors everywhere).
Data: the first ``--examples`` windows of ``char_dataset`` (block 64), batches of 8; on 2
processes each rank reads half. ``fisher_type="mc"`` (one sampled label per position: the exact
Fisher of a sequence model back-propagates C - 1 columns per position, 4,096 per window here). 1 process: the plain model; 2 processes: every Block and the
root wrapped with FSDP2's ``fully_shard``.

Columns, per rank (the largest over the ranks):

* time: the build's wall time (median of ``--repeats`` after one warm-up);
* peak: the peak resident memory during the build over the resident memory before it (a
  sampling thread reads /proc/self/statm every millisecond: an estimate, CPU only), in a fresh
  process per case after one plain forward + backward;
* held: the bytes of the tensors the operator keeps (exact);
* statistics during the pass: the most statistic bytes held at once during the pass (exact:
  ``ShardedFisher.pass_held``; a replicated build holds all of its statistics until the end);
* parameters during the pass: the most parameter bytes the rank held at any module's forward of
  the data pass (exact; DTensor shards count their local part). ``gather='unit'`` leaves out the
  first-batch checks, which run a few examples on the gathered model (P) before the pass.

Builds on 2 processes: ``replicated`` (``fl.fisher``), ``sharded, gather='all'`` and
``sharded, gather='unit'`` (``fisher_sharded``; docs/distributed.md). ``--size LxD`` picks
another model (e.g. ``8x256``).

Run: ``python benchmarks/bench_distributed.py`` (about a minute), ``--full`` for the 4 x 128
model of the language-model issue. Timings on a shared machine are noisy: re-measure quietly.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's fim_linops; the harness
from multiproc import run_in_processes  # noqa: E402  (the robust gloo harness of the tests)

MiB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Peak resident bytes over the value at entry, sampled every millisecond."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def _sizes(full: bool | str) -> dict[str, int]:
    """GPTConfig sizes: False -> 2 x 64, True -> the 4 x 128 default, "LxD" -> L layers of D."""
    if isinstance(full, str):
        layers, width = (int(t) for t in full.split("x"))
        return {"n_layer": layers, "n_embd": width, "n_head": 4}
    return {} if full else {"n_layer": 2, "n_embd": 64, "n_head": 4}


def _model_and_data(full: bool | str, examples: int) -> tuple[nn.Module, list]:
    from fim_linops.examples.nanogpt import NanoGPT, char_dataset

    torch.manual_seed(0)
    sizes = _sizes(full)
    model = NanoGPT(tie_weights=False, **sizes)
    x, y, _ = char_dataset(64)
    x, y = x[:examples], y[:examples]
    return model, [(x[i : i + 8], y[i : i + 8]) for i in range(0, examples, 8)]


def _params(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Embedding)]


def _held(op: Any) -> int:
    from fim_linops.sharding import ShardedFisher

    if isinstance(op, ShardedFisher):
        return op.held_bytes()
    return sum(t.numel() * t.element_size() for t in op._args if isinstance(t, torch.Tensor))


def _pass_stats(op: Any) -> int:
    """Statistic bytes held at once during the pass: ``ShardedFisher.pass_held`` (its share plus
    one layer's contribution in flight); a replicated build sums every statistic on every rank
    until its one all-reduce, i.e. what it keeps."""
    from fim_linops.sharding import ShardedFisher

    if isinstance(op, ShardedFisher):
        return op.pass_held * op.dtype.itemsize
    return _held(op)


BUILDS = ("replicated", "sharded, gather='all'", "sharded, gather='unit'")
CASES = [(s, b) for s in ("diag", "kfac") for b in BUILDS]


def _param_probe(model: nn.Module, how: str, seen: list[int]) -> list[Any]:
    """Forward pre-hooks on every module that record the parameter bytes this rank holds at
    that moment (a DTensor shard counts its local part, a gathered parameter all of it), over
    the data pass: with gather='unit' the first-batch checks' forwards (on the gathered model,
    a few examples, before the pass) are left out."""
    from fim_linops.sharding import gather as gather_mod

    def hook(module: nn.Module, args: Any) -> None:
        if "unit" in how and gather_mod._ACTIVE:
            return
        seen.append(
            sum(
                getattr(p, "_local_tensor", p).numel() * p.element_size()
                for p in model.parameters()
            )
        )

    return [m.register_forward_pre_hook(hook) for m in model.modules()]


def _worker(
    rank: int, world: int, full: bool | str, examples: int, repeats: int, cases: list
) -> list[dict]:
    """Time (median of ``repeats`` after a warm-up) or, with ``repeats=0``, the memory of one
    build after a warm plain forward + backward (a fresh process per case: the allocator has
    not yet cached memory freed by earlier builds, which would hide their peaks)."""
    import fim_linops as fl
    from fim_linops.sharding import fisher_sharded

    model, batches = _model_and_data(full, examples)
    params = [m for m in _params(model)]
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        half = len(batches) // world
        batches = batches[rank * half : (rank + 1) * half]
    x, y = batches[0]  # warm: autograd, the FSDP hooks and the process group once
    nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    model.zero_grad(set_to_none=True)
    builds = {
        "replicated": fl.fisher,
        "sharded, gather='all'": functools.partial(fisher_sharded, gather="all"),
        "sharded, gather='unit'": functools.partial(fisher_sharded, gather="unit"),
    }
    rows = []
    for structure, how in cases:
        times, peak, held, stats = [], 0, 0, 0
        params_seen: list[int] = []
        hooks = [] if repeats else _param_probe(model, how, params_seen)
        for i in range(repeats + 1):
            gen = torch.Generator().manual_seed(rank)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                op = builds[how](
                    model,
                    batches,
                    structure=structure,
                    params=params,
                    fisher_type="mc",
                    generator=gen,
                )
                dt = time.perf_counter() - t0
            if i == 0:
                peak = mem.delta
            else:  # the first round warms up the timing
                times.append(dt)
            held, stats = _held(op), _pass_stats(op)
            del op
        for h in hooks:
            h.remove()
        rows.append(
            {
                "procs": world,
                "build": how,
                "structure": structure,
                "time": statistics.median(times) if times else float("nan"),
                "peak": peak,
                "held": held,
                "stats": stats,
                "params": max(params_seen, default=0),
            }
        )
    return rows


def _run(world: int, args: argparse.Namespace, repeats: int, cases: list) -> list[dict]:
    ranks = run_in_processes(
        _worker,
        args=(args.full, args.examples, repeats, cases),
        world_size=world,
        timeout=1800.0,
    )
    return [  # per rank: the largest over the ranks
        {
            **row,
            **{k: max(r[i][k] for r in ranks) for k in ("time", "peak", "held", "stats", "params")},
        }
        for i, row in enumerate(ranks[0])
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the 4 x 128 model (default 2 x 64)")
    ap.add_argument("--size", default=None, help="LxD: L layers of width D (e.g. 8x256)")
    ap.add_argument("--examples", type=int, default=32, help="windows of 64 characters")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.size:
        args.full = args.size
    model, _ = _model_and_data(args.full, args.examples)
    p = sum(q.numel() for m in _params(model) for q in m.parameters())
    print(
        f"NanoGPT {args.size or ('4x128' if args.full else '2x64')}, P = {p:,} (Linear + Embedding), "
        f"{args.examples} windows of 64 characters, MC Fisher, float32, CPU, gloo"
    )
    table = []
    for world in (1, 2):
        cases = [c for c in CASES if world > 1 or c[1] == "replicated"]
        timed = _run(world, args, args.repeats, cases)
        for case, row in zip(cases, timed, strict=True):
            mem = _run(world, args, 0, [case])[0]  # a fresh process per case
            row["peak"], row["params"] = mem["peak"], mem["params"]
            table.append(row)
    print()
    print(
        "| structure | processes | build | time per rank (s) | peak per rank (MiB) "
        "| held per rank (MiB) | statistics during the pass (MiB) "
        "| parameters during the pass (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(table, key=lambda r: (r["structure"], r["procs"], r["build"])):
        print(
            f"| {r['structure']} | {r['procs']} | {r['build']} | {r['time']:.3f} | "
            f"{r['peak'] / MiB:.1f} | {r['held'] / MiB:.3f} | {r['stats'] / MiB:.3f} | "
            f"{r['params'] / MiB:.2f} |"
        )


if __name__ == "__main__":
    main()
