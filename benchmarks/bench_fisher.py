r"""Fisher build and product times of fim_linops against NNGeometry and curvlinops (issue 3).

Run from the repository root (CPU, two threads)::

    python benchmarks/bench_fisher.py            # MLP and CNN on digits, full repeats
    python benchmarks/bench_fisher.py --quick    # fewer repeats (a smoke run, noisier)
    python benchmarks/bench_fisher.py --resnet   # also the ResNet-18-sized model (minutes)
    python benchmarks/bench_fisher.py --plain-loader   # batches re-collated by a plain
                                                       # DataLoader inside every timing

Data: the first 1024 examples of sklearn's ``load_digits``, batches of 256, float32, inputs
(N, 64) for the MLP 64-256-256-10 and (N, 1, 8, 8) for the two-conv CNN (``models.py``). The
batches are materialised once and handed to every library (and the floor) through one
``DataLoader`` subclass that yields them without re-collating, so that data loading (about
15 ms per pass for a plain ``DataLoader`` over a ``TensorDataset``, most of a 20 ms floor) is not
part of any timing; NNGeometry needs a ``DataLoader`` (it reads ``len(loader.sampler)``).
``--plain-loader`` hands every library a plain ``DataLoader(TensorDataset, batch_size=256)``
instead: the collation cost then sits in every timing, the floor included, which compresses all
ratios toward 1 (the convention under which issue 3's reference ratios appear to have been taken:
its floors, 20 ms and 54 ms, match our floor plus one DataLoader pass).

Floor: one plain forward + backward of the summed cross-entropy over the same batches (into
``.grad``, which is then cleared).

Tasks, each a row (the Fisher of the categorical likelihood, mean over examples):

* ``diag exact`` / ``diag mc``: ``fl.fisher(structure="diag", fisher_type="exact"|"mc")``;
  NNGeometry ``FIM(..., PMatDiag, variant="classif_logits")`` /
  ``FIM_MonteCarlo(..., PMatDiag, trials=1)``; curvlinops has no exact or MC diagonal of the
  Fisher/GGN (only stochastic Hutchinson/XDiag estimators from many matrix-vector products, a
  different task): n/a.
* ``kfac exact`` / ``kfac mc``: ``fl.fisher(structure="kfac", ...)``; NNGeometry ``PMatKFAC``
  (``FIM`` / ``FIM_MonteCarlo(trials=1)``); curvlinops ``KFACLinearOperator(fisher_type=
  "type-2" | "mc", mc_samples=1, separate_weight_and_bias=False)`` followed by
  ``compute_kronecker_factors()`` (the same approximation as ours and NNGeometry's: weight and
  bias share one Kronecker block; curvlinops' default ``True`` is a different, coarser
  approximation at the same cost).
* ``implicit F @ v``: one exact product over the 1024 examples with a random v; the operators
  are built outside the timed region: ``fl.fisher(structure="implicit") @ v``; NNGeometry
  ``FIM(..., PMatImplicit).mv(PVector)``; curvlinops ``GGNLinearOperator @ v``.

Timing: per row, the libraries and the floor run round-robin (warm-up first, then ``repeats``
rounds, the order rotated each round) so that a change of machine load during a row hits all of
them alike; each time is the median over its rounds (``time.perf_counter``), and the floor is the
median of all its rounds in the model's table. Ratios are over that floor.

Target (issue 3): at most half the time of the fastest peer offering the task; where that falls
below the floor, within 1.2x the floor.

Agreement (printed in the table): relative differences ||ours - peer|| / ||ours|| of the exact
diagonal (NNGeometry), of KFAC products F v on a random v (both peers), of the implicit products
(both peers). Scaling: ours and NNGeometry's FIM are means over examples; curvlinops gets
``CrossEntropyLoss(reduction="mean")`` and ``num_data=1024`` (loss_average "batch"), which is the
same mean. MC rows are random: their column gives each library's relative difference to its own
exact counterpart (diagonal or KFAC product), a check that all three sample the same quantity.

ResNet (``--resnet``): a hand-written CIFAR ResNet-18 (11.2M parameters, BatchNorm in eval mode)
on 256 random (3, 32, 32) inputs in batches of 64 (``--resnet-batch``; fim_linops keeps K = 10
back-propagated columns of every layer output per batch, about 80 MB per input, so one batch of
256 would need about 20 GB, more than this 23 GB machine can spare); floor, exact diag, exact
KFAC twice: plain ``structure="kfac"`` (BatchNorm layers, which have no Kronecker factorisation,
get exact dense blocks automatically, in the same data pass) and the explicit per-layer mix
``{"default": "kfac", nn.BatchNorm2d: "block_diag"}`` it replaces (also one pass; the two
operators must agree and their times match within noise), and one implicit
product (operator built, then one F @ v timed), each once in its own subprocess so that the peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, i.e. peak RSS of that process)
belongs to that task alone; also printed: the RSS after set-up (torch, model and data loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import models  # noqa: E402

import fim_linops as fl  # noqa: E402

THREADS = 2


# -- data ------------------------------------------------------------------------------------------
class PreloadedLoader(DataLoader):
    """A DataLoader (for NNGeometry's isinstance check and ``len(loader.sampler)``) that yields
    batches materialised once, so that no library pays for collation inside a timing."""

    def __init__(self, loader: DataLoader):
        super().__init__(loader.dataset, batch_size=loader.batch_size, shuffle=False)
        self._batches = [tuple(t.contiguous() for t in b) for b in loader]

    def __iter__(self):
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


# -- timing ----------------------------------------------------------------------------------------
def round_robin(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Wall times of each fn over ``repeats`` rounds after ``warmup`` rounds, the fns interleaved
    (order rotated each round)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def floor_fn(model: nn.Module, loader: DataLoader) -> Callable[[], None]:
    """One plain forward + backward of the summed cross-entropy over the batches."""

    def run() -> None:
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    return run


def rel(a: Tensor, ref: Tensor) -> float:
    """||a - ref|| / ||ref||."""
    a, ref = a.detach().double().flatten(), ref.detach().double().flatten()
    return float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref))


# -- the libraries ---------------------------------------------------------------------------------
def ours_build(model, loader, structure: str, mc: bool):
    def run():
        kw: dict[str, Any] = {}
        if mc:
            kw = {
                "fisher_type": "mc",
                "mc_samples": 1,
                "generator": torch.Generator().manual_seed(0),
            }
        return fl.fisher(model, loader, likelihood="categorical", structure=structure, **kw)

    return run


def nng_build(model, loader, rep: str, mc: bool):
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatDiag, PMatImplicit, PMatKFAC

    cls = {"diag": PMatDiag, "kfac": PMatKFAC, "implicit": PMatImplicit}[rep]

    def run():
        if mc:
            return FIM_MonteCarlo(model, loader, cls, variant="classif_logits", trials=1)
        return FIM(model, loader, cls, variant="classif_logits")

    return run


def nng_mv(F, v: Tensor) -> Tensor:
    from nngeometry.object.vector import PVector

    return F.mv(PVector(F.generator.layer_collection, vector_repr=v)).to_torch()


def nng_diag(F) -> Tensor:
    return F.get_diag()


def cl_kfac_build(model, loader, n: int, mc: bool):
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        F = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            params,
            loader,
            fisher_type="mc" if mc else "type-2",
            mc_samples=1,
            check_deterministic=False,
            separate_weight_and_bias=False,
            num_data=n,
        )
        F.compute_kronecker_factors()
        return F

    return run


def cl_ggn(model, loader, n: int):
    from curvlinops import GGNLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    return GGNLinearOperator(
        model, nn.CrossEntropyLoss(), params, loader, check_deterministic=False, num_data=n
    )


# -- one model -------------------------------------------------------------------------------------
LIBS = ("fim_linops", "NNGeometry", "curvlinops")


def bench_model(name: str, model: nn.Module, loader: DataLoader, repeats: int, warmup: int) -> dict:
    n = len(loader.sampler)
    p = models.num_params(model)
    v = torch.randn(p, generator=torch.Generator().manual_seed(1))
    floor = floor_fn(model, loader)
    floor_times: list[float] = []
    rows: list[dict[str, Any]] = []

    def row(task: str, fns: dict[str, Callable[[], Any]], agree: str) -> None:
        times = round_robin({**fns, "floor": floor}, repeats, warmup)
        floor_times.extend(times.pop("floor"))
        print(f"  {name}: {task} done", file=sys.stderr, flush=True)
        rows.append(
            {
                "task": task,
                "times": {k: statistics.median(t) for k, t in times.items()},
                "mins": {k: min(t) for k, t in times.items()},
                "agree": agree,
            }
        )

    # reference objects for the agreement checks (outside any timing)
    d_ours = ours_build(model, loader, "diag", False)().diagonal()
    d_nng = nng_diag(nng_build(model, loader, "diag", False)())
    dmc_ours = ours_build(model, loader, "diag", True)().diagonal()
    dmc_nng = nng_diag(nng_build(model, loader, "diag", True)())
    K_ours = ours_build(model, loader, "kfac", False)()
    kv_ours = K_ours @ v
    kv_nng = nng_mv(nng_build(model, loader, "kfac", False)(), v)
    kv_cl = cl_kfac_build(model, loader, n, False)() @ v
    kvmc_ours = ours_build(model, loader, "kfac", True)() @ v
    kvmc_nng = nng_mv(nng_build(model, loader, "kfac", True)(), v)
    kvmc_cl = cl_kfac_build(model, loader, n, True)() @ v

    F_ours = ours_build(model, loader, "implicit", False)()
    F_nng = nng_build(model, loader, "implicit", False)()
    G_cl = cl_ggn(model, loader, n)
    iv_ours, iv_nng, iv_cl = F_ours @ v, nng_mv(F_nng, v), G_cl @ v

    row(
        "diag exact",
        {
            "fim_linops": ours_build(model, loader, "diag", False),
            "NNGeometry": nng_build(model, loader, "diag", False),
        },
        f"diag vs NNG {rel(d_nng, d_ours):.0e}",
    )
    row(
        "diag mc (1 sample)",
        {
            "fim_linops": ours_build(model, loader, "diag", True),
            "NNGeometry": nng_build(model, loader, "diag", True),
        },
        f"MC vs exact: ours {rel(dmc_ours, d_ours):.2f}, NNG {rel(dmc_nng, d_nng):.2f}",
    )
    row(
        "kfac exact",
        {
            "fim_linops": ours_build(model, loader, "kfac", False),
            "NNGeometry": nng_build(model, loader, "kfac", False),
            "curvlinops": cl_kfac_build(model, loader, n, False),
        },
        f"Fv vs NNG {rel(kv_nng, kv_ours):.0e}, CL {rel(kv_cl, kv_ours):.0e}",
    )
    row(
        "kfac mc (1 sample)",
        {
            "fim_linops": ours_build(model, loader, "kfac", True),
            "NNGeometry": nng_build(model, loader, "kfac", True),
            "curvlinops": cl_kfac_build(model, loader, n, True),
        },
        f"MC vs exact Fv: ours {rel(kvmc_ours, kv_ours):.2f}, NNG {rel(kvmc_nng, kv_nng):.2f}, "
        f"CL {rel(kvmc_cl, kv_cl):.2f}",
    )
    row(
        "implicit F @ v",
        {
            "fim_linops": lambda: F_ours @ v,
            "NNGeometry": lambda: nng_mv(F_nng, v),
            "curvlinops": lambda: G_cl @ v,
        },
        f"Fv vs NNG {rel(iv_nng, iv_ours):.0e}, CL {rel(iv_cl, iv_ours):.0e}",
    )

    return {
        "name": name,
        "params": p,
        "floor": statistics.median(floor_times),
        "floor_spread": (min(floor_times), max(floor_times)),
        "rows": rows,
    }


def min_line(res: dict) -> str:
    """The same ratios from each library's fastest round over the fastest floor round (less
    sensitive to other processes on the machine than the medians)."""
    f = res["floor_spread"][0]
    parts = []
    for r in res["rows"]:
        m = r["mins"]
        cells = "/".join(f"{m[lib] / f:.2f}" if lib in m else "n/a" for lib in LIBS)
        parts.append(f"{r['task']} {cells}")
    return (
        "Ratios from the fastest rounds (fim_linops/NNGeometry/curvlinops over the fastest "
        "floor): " + "; ".join(parts)
    )


def target_of(t_floor: float, t_peer: float | None) -> float | None:
    """Issue 3: half the fastest peer; where that falls below the floor, 1.2x the floor."""
    if t_peer is None:
        return None
    return 0.5 * t_peer if 0.5 * t_peer >= t_floor else 1.2 * t_floor


def fmt_t(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def table(res: dict) -> str:
    f = res["floor"]
    lines = [
        f"### {res['name']} (P = {res['params']:,}); floor {fmt_t(f)} "
        f"(min {fmt_t(res['floor_spread'][0])}, max {fmt_t(res['floor_spread'][1])})",
        "",
        "| task | fim_linops | / floor | NNGeometry | / floor | curvlinops | / floor | "
        "speed-up vs fastest peer | target / floor | met | agreement (rel. diff.) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---|",
    ]
    for r in res["rows"]:
        t = r["times"]
        cells = []
        for lib in LIBS:
            if lib in t:
                cells += [fmt_t(t[lib]), f"{t[lib] / f:.2f}x"]
            else:
                cells += ["n/a", ""]
        peers = [t[lib] for lib in LIBS[1:] if lib in t]
        best = min(peers) if peers else None
        tgt = target_of(f, best)
        speed = f"{best / t['fim_linops']:.2f}x" if best else ""
        met = "" if tgt is None else ("yes" if t["fim_linops"] <= tgt else "NO")
        tg = "" if tgt is None else f"{tgt / f:.2f}x"
        lines.append(
            f"| {r['task']} | " + " | ".join(cells) + f" | {speed} | {tg} | {met} | {r['agree']} |"
        )
    return "\n".join(lines)


# -- ResNet (each task in its own process, for its own peak RSS) -----------------------------------
RESNET_TASKS = ("floor", "diag", "kfac", "kfac_mix", "implicit")
KFAC_RESNET: dict = {"default": "kfac", nn.BatchNorm2d: "block_diag"}


def rss_now_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def resnet_task(task: str, n: int, batch: int) -> dict:
    """Run one ResNet task once (the floor: median of 3 after a warm-up) in this process."""
    torch.set_num_threads(THREADS)
    model = models.resnet18()
    loader = PreloadedLoader(models.cifar_like_batches(n, batch))
    p = models.num_params(model)
    v = torch.randn(p, generator=torch.Generator().manual_seed(1))
    base = rss_now_kib()
    out: dict[str, Any] = {"task": task, "params": p, "n": n, "batch": batch, "rss_setup_kib": base}
    t0 = time.perf_counter()
    if task == "floor":
        times = round_robin({"floor": floor_fn(model, loader)}, repeats=3, warmup=1)["floor"]
        out["time"] = statistics.median(times)
    elif task in ("diag", "kfac", "kfac_mix"):
        # BatchNorm has no Kronecker factorisation: plain "kfac" gives its (weight, bias) exact
        # 2C x 2C blocks by itself; "kfac_mix" is the explicit mix that did it before (one pass)
        structure = {"diag": "diag", "kfac": "kfac", "kfac_mix": KFAC_RESNET}[task]
        F = fl.fisher(model, loader, structure=structure)
        out["time"] = time.perf_counter() - t0
        out["check"] = float(F.diagonal().sum()) if task == "diag" else float((F @ v).norm())
    else:
        F = fl.fisher(model, loader, structure="implicit")
        out["build"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        with torch.no_grad():
            w = F @ v
        out["time"] = time.perf_counter() - t1
        out["check"] = float(w.norm())
    out["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def bench_resnet(timeout: int, batch: int) -> list[dict]:
    results = []
    for task in RESNET_TASKS:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--resnet-task",
            task,
            "--resnet-batch",
            str(batch),
        ]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            results.append({"task": task, "error": f"timed out after {timeout} s"})
            continue
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results.append(
                {
                    "task": task,
                    "error": f"exit {proc.returncode}: {' / '.join(tail)}",
                    "wall": time.perf_counter() - t0,
                }
            )
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(
            f"  resnet {task}: done in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return results


def resnet_table(results: list[dict]) -> str:
    floor = next((r.get("time") for r in results if r["task"] == "floor"), None)
    p = next((r["params"] for r in results if "params" in r), 0)
    b = next((r["batch"] for r in results if "batch" in r), "?")
    gib = 1024**2  # KiB per GiB
    lines = [
        f"### ResNet-18 (hand-written, P = {p:,}), 256 random 3x32x32 inputs in batches of {b}, "
        f"BatchNorm eval; floor {fmt_t(floor) if floor else 'n/a'}",
        "",
        "| task | fim_linops time | / floor | peak RSS of the process | RSS after set-up | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    names = {
        "floor": "floor (fwd+bwd, median of 3)",
        "diag": "diag exact (build)",
        "kfac": 'kfac exact, structure="kfac" (build)',
        "kfac_mix": "kfac exact, mix {default: kfac, BatchNorm2d: block_diag} (build)",
        "implicit": "implicit: one F @ v",
    }
    for r in results:
        if "error" in r:
            lines.append(f"| {names[r['task']]} | failed | | | | {r['error']} |")
            continue
        ratio = f"{r['time'] / floor:.2f}x" if floor else ""
        note = f"operator build {fmt_t(r['build'])}" if "build" in r else ""
        if r["task"] == "kfac_mix" and "check" in r:
            plain = next((q for q in results if q["task"] == "kfac" and "check" in q), None)
            if plain is not None:  # the same operator: ||F v|| of both
                diff = abs(r["check"] - plain["check"]) / max(abs(plain["check"]), 1e-30)
                note = f"rel. diff of F v norms to plain kfac {diff:.1e}"
        lines.append(
            f"| {names[r['task']]} | {fmt_t(r['time'])} | {ratio} | "
            f"{r['peak_rss_kib'] / gib:.2f} GiB | {r['rss_setup_kib'] / gib:.2f} GiB | {note} |"
        )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------
def header() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib.metadata import version

    return (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {os.cpu_count()} cores, CPU, "
        f"torch.set_num_threads({torch.get_num_threads()}), torch {torch.__version__}, "
        f"nngeometry {version('nngeometry')}, curvlinops-for-pytorch "
        f"{version('curvlinops-for-pytorch')}, fim_linops {getattr(fl, '__version__', '?')}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up, 3 rounds (noisier)")
    ap.add_argument("--resnet", action="store_true", help="also the ResNet-18-sized model")
    ap.add_argument(
        "--plain-loader",
        action="store_true",
        help="a plain DataLoader (collation inside every timing) instead of preloaded batches",
    )
    ap.add_argument("--no-digits", action="store_true", help="skip the MLP and CNN tables")
    ap.add_argument("--repeats", type=int, default=None, help="rounds per row (default 7, quick 3)")
    ap.add_argument("--resnet-timeout", type=int, default=1800, help="seconds per ResNet task")
    ap.add_argument(
        "--resnet-batch",
        type=int,
        default=64,
        help="ResNet batch size (of the 256 inputs; default 64: see the README on memory)",
    )
    ap.add_argument("--resnet-n", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--resnet-task", choices=RESNET_TASKS, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.resnet_task:
        print(json.dumps(resnet_task(args.resnet_task, args.resnet_n, args.resnet_batch)))
        return

    torch.set_num_threads(THREADS)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    print(header())
    loading = "plain DataLoader (collation timed)" if args.plain_loader else "preloaded batches"
    print(
        f"digits: N=1024, batch 256, float32, {loading}; {warmup} warm-up + {repeats} "
        "round-robin rounds, medians\n",
        flush=True,
    )
    if not args.no_digits:
        for name, build, image in (
            ("MLP 64-256-256-10", models.mlp, False),
            ("CNN 2 conv + linear", models.cnn, True),
        ):
            loader = models.digits_batches(image)
            if not args.plain_loader:
                loader = PreloadedLoader(loader)
            res = bench_model(name, build(), loader, repeats, warmup)
            print(table(res) + "\n\n" + min_line(res) + "\n", flush=True)
    if args.resnet:
        print(resnet_table(bench_resnet(args.resnet_timeout, args.resnet_batch)) + "\n")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
