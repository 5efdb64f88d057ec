r"""Full finite-width NTK Gram of fim_linops against NNGeometry and torch.func (issue 5).

Run from the repository root (CPU, two threads)::

    python benchmarks/bench_ntk.py              # MLP and CNN, 256 digits x 10 outputs
    python benchmarks/bench_ntk.py --quick      # 1 warm-up + 3 rounds (noisier)
    python benchmarks/bench_ntk.py --n 128      # the issue's 128 x 10 setting

Task: Theta = J J^T of shape (N*C, N*C) = (2560, 2560) for N = 256 digits (the first 256 of
``load_digits``, one batch, float32) and C = 10 outputs, on the MLP 64-256-256-10 and on the
two-conv CNN of ``models.py``. Every method returns the whole Gram as a tensor:

* ``fim_linops``: ``fl.ntk(model, x, structure="dense").to_dense()`` (per-layer Gram rules from
  one forward and one batched backward of the C identity columns; Linear layers as
  (A A^T + 1) * (G G^T), convolutions from unfolded patches);
* ``nngeometry``: ``GramMatrix(model, loader, function=...)`` (``FMatDense``, nngeometry 0.4;
  its ``.data`` has shape (C, N, C, N));
* ``func jac``: the torch.func tutorial's Jacobian contraction: ``vmap(jacrev(f))`` over the
  examples, then per parameter ``einsum("Naf,Mbf->NMab")`` summed (the Jacobian is computed once
  since x2 = x1);
* ``func ntk-vp``: the tutorial's NTK-vector products, for all N*C columns: one ``vjp`` at x,
  then ``vmap`` over the basis columns (chunks of 256) of ``jvp(f, vjp(e))``. (The tutorial's
  double vmap over pairs of single examples would hold N^2 C parameter-sized cotangents, 222 GB
  here; batching the pairs as one (N, C) cotangent is the same recipe without that.)

Floor: one plain forward + backward of the summed cross-entropy over the same 256 examples.
Timing: the methods and the floor run round-robin (``bench_fisher.round_robin``: warm-up, then
``repeats`` rounds with the order rotated); each time is the median of its rounds, ratios are
over the floor's median. A method whose first call (the memory measurement) takes longer than
``--slow`` seconds (default 10; the torch.func peers) is not repeated: its time is the median of
that first call and two more, taken after the round-robin (marked "3 calls"). Memory: the peak resident set size during one call, over the resident
size just before it (Linux: ``/proc/self/clear_refs`` resets ``VmHWM``, then ``VmHWM - VmRSS``),
so "extra memory touched by the task" in the same process; memory freed by an earlier method
and still resident makes this an underestimate for later methods. ``--memory fim_linops,...``
measures instead each method in a fresh process: ``ru_maxrss`` minus the RSS after set-up.
Agreement: ||peer - ours|| / ||ours||
of the Gram in the same (row n*C + c) order.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import models  # noqa: E402
from bench_fisher import PreloadedLoader, floor_fn, rel, round_robin  # noqa: E402

import fim_linops as fl  # noqa: E402

THREADS = 2
CHUNK = 256  # basis columns per vmap chunk of the NTK-vector products


# -- methods: each returns the Gram (N*C, N*C), row n*C + c ----------------------------------------
def ours(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    def run() -> Tensor:
        return fl.ntk(model, x, structure="dense").to_dense()

    return run


def nngeometry(model: nn.Module, loader) -> Callable[[], Tensor]:
    from nngeometry import GramMatrix

    def run() -> Tensor:
        gram = GramMatrix(model, loader, function=lambda x, y: model(x))
        c, n = gram.data.shape[:2]
        # (c, n, d, m) -> (n, c, m, d): row n*C + c
        return gram.data.permute(1, 0, 3, 2).reshape(n * c, n * c)

    return run


def _functional(model: nn.Module):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, p, (x,))

    return f, params


def func_jacobian(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    f, params = _functional(model)

    def single(p: dict[str, Tensor], x_n: Tensor) -> Tensor:
        return f(p, x_n[None])[0]

    def run() -> Tensor:
        jac = vmap(jacrev(single), (None, 0))(params, x)  # name -> (N, C, *shape)
        # N, M: examples; a, b: outputs; f: parameters of one tensor
        blocks = [j.flatten(2) for j in jac.values()]
        out = sum(torch.einsum("Naf,Mbf->NaMb", j, j) for j in blocks)
        n, c = x.shape[0], out.shape[1]
        return out.reshape(n * c, n * c)

    return run


def func_ntk_vp(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    f, params = _functional(model)

    def run() -> Tensor:
        def f_x(p: dict[str, Tensor]) -> Tensor:
            return f(p, x)

        out, pullback = vjp(f_x, params)

        def column(e: Tensor) -> Tensor:  # e (N, C) -> Theta e (N, C)
            return jvp(f_x, (params,), pullback(e))[1]

        nc = out.numel()
        basis = torch.eye(nc, dtype=out.dtype).reshape(nc, *out.shape)
        return vmap(column, chunk_size=CHUNK)(basis).reshape(nc, nc)  # symmetric

    return run


# -- memory ----------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def peak_extra_mib(fn: Callable[[], Tensor]) -> tuple[float, Tensor]:
    """Peak RSS during one call over the RSS before it, MiB (and the result)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = fn()
    return (_status_kib("VmHWM") - before) / 1024, out


# -- one model -------------------------------------------------------------------------------------
def bench_model(
    name: str, model: nn.Module, image: bool, n: int, repeats: int, warmup: int, slow: float
) -> dict:
    loader = PreloadedLoader(models.digits_batches(image, n=n, batch=n))
    x = loader._batches[0][0]
    fns: dict[str, Callable[[], Tensor]] = {
        "fim_linops": ours(model, x),
        "nngeometry": nngeometry(model, loader),
        "func jac": func_jacobian(model, x),
        "func ntk-vp": func_ntk_vp(model, x),
    }
    floor = floor_fn(model, loader)
    mem, results, first = {}, {}, {}
    for k, fn in fns.items():  # one call each first: memory and agreement
        t0 = time.perf_counter()
        mem[k], results[k] = peak_extra_mib(fn)
        first[k] = time.perf_counter() - t0
        print(f"  {name}: {k} first call {first[k]:.2f} s, {mem[k]:.0f} MiB", flush=True)
    mem["floor"], _ = peak_extra_mib(lambda: floor() or torch.zeros(()))
    fast = {k: fn for k, fn in fns.items() if first[k] <= slow}
    times = round_robin({"floor": floor, **fast}, repeats=repeats, warmup=warmup)
    for k, fn in fns.items():
        if k not in fast:
            times[k] = [first[k]] + list(round_robin({k: fn}, repeats=2, warmup=0)[k])
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = results["fim_linops"]
    agree = {k: rel(v, ref) for k, v in results.items() if k != "fim_linops"}
    return {
        "name": name,
        "params": models.num_params(model),
        "n": n,
        "times": med,
        "mins": {k: min(v) for k, v in times.items()},
        "mem": mem,
        "agree": agree,
        "calls": {k: len(v) for k, v in times.items()},
    }


def table(res: dict) -> str:
    t, floor = res["times"], res["times"]["floor"]
    peers = [k for k in t if k not in ("floor", "fim_linops")]
    fastest = min(peers, key=lambda k: t[k])
    lines = [
        f"### {res['name']} (P = {res['params']:,}), N = {res['n']}, C = 10: floor "
        f"{floor * 1e3:.1f} ms (min {res['mins']['floor'] * 1e3:.1f} ms)",
        "",
        "| method | time | / floor | / fastest peer | peak extra RSS | rel. diff to ours |",
        "|---|---|---|---|---|---|",
    ]
    for k in t:
        ratio = "" if k == "floor" else f"{t[k] / t[fastest]:.3f}"
        agree = f"{res['agree'][k]:.1e}" if k in res["agree"] else ""
        calls = f" ({res['calls'][k]} calls)" if res["calls"][k] < 4 else ""
        lines.append(
            f"| {k} | {t[k] * 1e3:.1f} ms{calls} | {t[k] / floor:.1f}x | {ratio} | "
            f"{res['mem'][k]:.0f} MiB | {agree} |"
        )
    ok_floor = t["fim_linops"] <= 2 * floor
    ok_peer = t["fim_linops"] <= 0.5 * t[fastest]
    lines += [
        "",
        f"Fastest peer: {fastest}. Targets: within 2x the floor: "
        f"{'met' if ok_floor else 'not met'} ({t['fim_linops'] / floor:.1f}x); at most half the "
        f"fastest peer: {'met' if ok_peer else 'not met'} ({t['fim_linops'] / t[fastest]:.3f}).",
    ]
    return "\n".join(lines)


SPECS = {
    "mlp": ("MLP 64-256-256-10", models.mlp, False),
    "cnn": ("CNN 2 conv + linear", models.cnn, True),
}
METHODS = ("fim_linops", "nngeometry", "func jac", "func ntk-vp")


def child(model_key: str, method: str, n: int) -> None:
    """One call of one method in this (fresh) process; prints its peak RSS over the RSS after
    set-up (torch, libraries, model and data loaded), MiB."""
    import resource

    torch.set_num_threads(THREADS)
    _, make, image = SPECS[model_key]
    model = make()
    loader = PreloadedLoader(models.digits_batches(image, n=n, batch=n))
    x = loader._batches[0][0]
    fn = {
        "fim_linops": lambda: ours(model, x),
        "nngeometry": lambda: nngeometry(model, loader),
        "func jac": lambda: func_jacobian(model, x),
        "func ntk-vp": lambda: func_ntk_vp(model, x),
    }[method]()
    base = _status_kib("VmRSS")
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{(peak - base) / 1024:.1f}")


def fresh_memory(keys: list[str], n: int, methods: tuple[str, ...]) -> str:
    """Peak RSS of each method in a fresh process per (model, method)."""
    import subprocess

    lines = ["| model | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for key in keys:
        cells = []
        for method in methods:
            out = subprocess.run(
                [sys.executable, __file__, "--child", key, method, "--n", str(n)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[-1]
            cells.append(f"{float(out):.0f} MiB")
            print(f"  {key} {method}: {out} MiB", flush=True)
        lines.append(f"| {SPECS[key][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 rounds")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--n", type=int, default=256, help="examples (default 256)")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--slow", type=float, default=10.0, help="seconds: time such methods 3x only")
    ap.add_argument(
        "--memory",
        default=None,
        help="comma-separated methods: only their peak RSS, each in a fresh process",
    )
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.n)
        return
    if args.memory:
        methods = tuple(m.strip() for m in args.memory.split(","))
        print(fresh_memory(args.models.split(","), args.n, methods))
        return
    torch.set_num_threads(THREADS)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    import nngeometry

    print(
        f"torch {torch.__version__}, nngeometry {getattr(nngeometry, '__version__', '0.4')}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{repeats} rounds after {warmup} warm-up"
    )
    for key in args.models.split(","):
        name, make, image = SPECS[key]
        res = bench_model(name, make(), image, args.n, repeats, warmup, args.slow)
        print(table(res), flush=True)
        print()


if __name__ == "__main__":
    main()
