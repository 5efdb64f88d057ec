r"""fim_linops on one device (CUDA or CPU): time and peak memory of each operation, one table.

    python benchmarks/bench_device.py --device cuda            # MLP and CNN on digits
    python benchmarks/bench_device.py --device cuda --resnet   # also ResNet-18 on CIFAR-shaped data
    python benchmarks/bench_device.py --device cpu --quick     # the dry run gpu_check.sh does on CPU

Data and models are those of ``bench_fisher.py`` (``benchmarks/models.py``): the first ``--n``
digits (default 1024) in batches of ``--batch`` (256), float32, an MLP 64-256-256-10 and a CNN
with two 3x3 convolutions; with ``--resnet`` the hand-written ResNet-18 (11.2M parameters, eval
mode) on ``--resnet-n`` (256) random CIFAR-shaped inputs in batches of 64. The batches are moved
to the device once, before any timing.

Rows, per model: ``floor`` (one plain forward + backward of the summed cross-entropy over all the
batches), the builds ``fl.fisher(structure=diag|kfac|ekfac)`` (exact Fisher), one implicit product
``F @ v`` (operator built outside the timed region), the NTK Gram ``fl.ntk(structure="dense",
outputs="sum")`` of the first ``--ntk-n`` (256) examples, and a KFAC ``Laplace`` fit with its log
marginal likelihood. Each entry is the median over ``--repeats`` rounds after one warm-up.

Timing: on CUDA between ``torch.cuda.Event``\ s with ``torch.cuda.synchronize()`` before the start
and after the end (the kernels' time, not the launch time); on CPU ``time.perf_counter``. Peak
memory: on CUDA ``torch.cuda.max_memory_allocated()`` during the operation minus what was
allocated before it (``reset_peak_memory_stats`` first), i.e. the operation's own working set plus
its result; on CPU not measured ("-").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=FutureWarning)

from models import cifar_like_batches, cnn, digits_batches, mlp, num_params, resnet18  # noqa: E402

import fim_linops as fl  # noqa: E402

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def measure(
    fn: Callable[[], Any], device: torch.device, repeats: int
) -> tuple[float, float | None]:
    """Median seconds of ``fn()`` over ``repeats`` rounds after one warm-up, and its peak memory
    in bytes above what was allocated before it (CUDA only; None on CPU)."""
    cuda = device.type == "cuda"
    fn()  # warm-up: kernels compiled/cached, allocator pools filled
    times, peak = [], 0
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
            del out
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), (float(peak) if cuda else None)


def floor(model: nn.Module, batches: Batches) -> Callable[[], None]:
    def run() -> None:
        for x, y in batches:
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    return run


def tasks(model: nn.Module, batches: Batches, ntk_n: int) -> dict[str, Callable[[], Any]]:
    """The timed operations on one model (closures; each returns its result)."""
    F_impl = fl.fisher(model, batches, structure="implicit")
    p = F_impl.shape[-1]
    gen = torch.Generator(device=batches[0][0].device).manual_seed(0)
    v = torch.randn(p, device=batches[0][0].device, generator=gen)
    x_ntk = torch.cat([x for x, _ in batches])[:ntk_n]

    def laplace() -> torch.Tensor:
        la = fl.laplace.Laplace(model, batches, structure="kfac", prior_precision=1.0)
        return la.log_marginal_likelihood()

    return {
        "diag": lambda: fl.fisher(model, batches, structure="diag"),
        "kfac": lambda: fl.fisher(model, batches, structure="kfac"),
        "ekfac": lambda: fl.fisher(model, batches, structure="ekfac"),
        "implicit F@v": lambda: F_impl @ v,
        f"ntk dense sum ({x_ntk.shape[0]})": lambda: fl.ntk(
            model, x_ntk, structure="dense", outputs="sum"
        ).to_dense(),
        "laplace kfac + lml": laplace,
    }


def bench(
    name: str, model: nn.Module, loader: Any, device: torch.device, repeats: int, ntk_n: int
) -> list[dict[str, Any]]:
    model = model.to(device)
    batches: Batches = [(x.to(device), y.to(device)) for x, y in loader]
    n = sum(x.shape[0] for x, _ in batches)
    label = f"{name} (P={num_params(model):,}, N={n})"
    base, base_mem = measure(floor(model, batches), device, repeats)
    rows = [{"model": label, "task": "floor fwd+bwd", "s": base, "mem": base_mem, "x": 1.0}]
    for task, fn in tasks(model, batches, ntk_n).items():
        t, mem = measure(fn, device, repeats)
        rows.append({"model": label, "task": task, "s": t, "mem": mem, "x": t / base})
        print(f"  {label} {task}: {t * 1e3:.2f} ms", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | task | median | peak MiB | x floor |", "|---|---|---:|---:|---:|"]
    for r in rows:
        t = r["s"]
        ts = f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"
        mem = "-" if r["mem"] is None else f"{r['mem'] / 2**20:.1f}"
        lines.append(f"| {r['model']} | {r['task']} | {ts} | {mem} | {r['x']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device",
        default=os.environ.get("DEVICE", "cuda" if torch.cuda.is_available() else "cpu"),
        help="cuda, cuda:1 or cpu (default: $DEVICE, else cuda when available)",
    )
    ap.add_argument("--n", type=int, default=1024, help="digits examples (default 1024)")
    ap.add_argument("--batch", type=int, default=256, help="batch size on digits (default 256)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per row (default 5)")
    ap.add_argument("--ntk-n", type=int, default=256, help="examples of the NTK Gram (256)")
    ap.add_argument("--quick", action="store_true", help="N=256, 2 rounds, NTK of 64 examples")
    ap.add_argument("--resnet", action="store_true", help="also ResNet-18 (CIFAR-shaped data)")
    ap.add_argument("--resnet-n", type=int, default=256, help="ResNet examples (default 256)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device} but torch.cuda.is_available() is False; use --device cpu")
    if args.quick:
        args.n, args.repeats, args.ntk_n = 256, 2, 64
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    rows = bench(
        "MLP", mlp(), digits_batches(False, args.n, args.batch), device, args.repeats, args.ntk_n
    )
    rows += bench(
        "CNN", cnn(), digits_batches(True, args.n, args.batch), device, args.repeats, args.ntk_n
    )
    if args.resnet:
        loader = cifar_like_batches(args.resnet_n, 64)
        rows += bench("ResNet-18", resnet18(), loader, device, args.repeats, min(args.ntk_n, 64))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{where} ({device}), float32, torch {torch.__version__}, median of {args.repeats}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
