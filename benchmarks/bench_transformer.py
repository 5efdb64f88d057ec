r"""Fisher builds and products of a nanoGPT-style character transformer (issue 18, item 9).

Run from the repository root (CPU, float32, two threads; about 6 minutes)::

    python benchmarks/bench_transformer.py                # timings, agreement, peak memory
    python benchmarks/bench_transformer.py --repeats 3    # fewer rounds (noisier)
    python benchmarks/bench_transformer.py --no-peak      # skip the peak-memory subprocesses

Model: :class:`fim_linops.examples.nanogpt.NanoGPT` with 4 layers, width 128, 4 heads, context
64, vocabulary 65, untied LM head (P = 818,176: 17 Linear layers hold 799,360 of them, the rest
are LayerNorm and the two embeddings). Data: 256 windows of 64 characters of the
text shipped in ``fim_linops/assets`` (``char_dataset(64, stride=32)``), labels the next
character, in 8 batches of 32 sequences. Categorical likelihood on every position, so each
sequence has T = 64 terms (``positions="sum"``: F = 1/N sum_n sum_t E[g_nt g_nt^T]).

Floor: one plain forward + backward of the summed per-token cross-entropy over the 8 batches.

Rows (each the build of ``fl.fisher(model, data, structure=..., fisher_type=...)`` or one product,
timed round-robin with the floor and the peer, medians of ``--repeats`` rounds after a warm-up):

* ``kfac mc`` (1 sample, ``kfac_approx="expand"``), all parameters (LayerNorm, embeddings: exact
  diagonal / dense blocks, see ``F.describe()``) and on the Linear layers only (``params=``) next
  to curvlinops ``KFACLinearOperator(fisher_type="mc", mc_samples=1, kfac_approx="expand",
  separate_weight_and_bias=False)`` + ``compute_kronecker_factors()`` on the same Linear
  parameters: curvlinops' KFAC raises on LayerNorm and Embedding parameters, and its
  ``CrossEntropyLoss`` takes (N, V, T) logits, so it gets the model wrapped in a transpose.
* ``diag mc`` (1 sample), ``ekfac mc`` (1 sample): ours only (curvlinops has no MC diagonal; its
  EKFAC refuses sequence outputs: the script prints its error).
* ``implicit F @ v``: one exact product on all parameters, operators built outside the timed
  region; curvlinops ``GGNLinearOperator @ v`` with the transposed model.
* ``diag exact``: T (V - 1) = 4,032 back-propagated columns per sequence (one per position and
  class of the Hessian square root), so it is timed on ``--exact-seqs`` sequences (default 1) once
  and scaled linearly to 256 (the cost is linear in the sequences; the scaling is the row's
  estimate, said so in the table).

Hand-written minimum (``transformer_minimal.py``, in the same round robin): the Linear layers' MC
KFAC and the product in plain torch with nothing but their arithmetic: a measured lower bound.

Agreement (outside the timings): the empirical-Fisher KFAC (deterministic) of ours and curvlinops
on the Linear layers, and the implicit products, relative difference of products with a random v
(``positions="mean"`` against curvlinops' ``reduction="mean"``: both divide by N T).

Peak memory: every task once more in its own subprocess (``--peak TASK``), peak resident set size
(``VmHWM``) minus the same process's peak before the task (model, data and imports).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="the exact Fisher back-propagates")

import fim_linops as fl  # noqa: E402
from fim_linops.examples.nanogpt import GPTConfig, NanoGPT, char_dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_minimal import minimal_fvp, minimal_kfac  # noqa: E402

N, BATCH, T, V = 256, 32, 64, 65


def setup() -> tuple[nn.Module, list[tuple[Tensor, Tensor]], list[nn.Module]]:
    torch.manual_seed(0)
    model = NanoGPT(
        GPTConfig(vocab_size=V, block_size=T, n_layer=4, n_head=4, n_embd=128, tie_weights=False)
    )
    x, y, _ = char_dataset(T, stride=T // 2)
    x, y = x[:N], y[:N]
    data = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return model, data, linears


class NVT(nn.Module):
    """The model with (N, V, T) logits, the layout torch's and curvlinops' CrossEntropyLoss take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).transpose(1, 2)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# -- the tasks -------------------------------------------------------------------------------------
def floor_fn(model, data) -> Callable[[], None]:
    def run() -> None:
        for x, y in data:
            logits = model(x)
            nn.functional.cross_entropy(
                logits.flatten(0, 1), y.flatten(), reduction="sum"
            ).backward()
        model.zero_grad(set_to_none=True)

    return run


def ours(model, data, structure: str, ftype: str = "mc", params=None, **kw) -> Callable[[], Any]:
    def run():
        g = gen() if ftype == "mc" else None
        return fl.fisher(
            model, data, structure=structure, fisher_type=ftype, params=params, generator=g, **kw
        )

    return run


def cl_kfac(model, data, linears, ftype: str = "mc", reduction: str = "sum"):
    from curvlinops import KFACLinearOperator

    # a private copy: curvlinops' KFAC leaves its input hooks on the model it is given, which
    # then break the torch.func transforms of the GGN products on the same model
    twin = copy.deepcopy(model)
    index = {id(m): i for i, m in enumerate(model.modules())}
    twin_modules = list(twin.modules())
    params = [p for m in linears for p in twin_modules[index[id(m)]].parameters()]
    wrapped = NVT(twin)

    def run():
        F = KFACLinearOperator(
            wrapped,
            nn.CrossEntropyLoss(reduction=reduction),
            params,
            data,
            fisher_type=ftype,
            mc_samples=1,
            kfac_approx="expand",
            check_deterministic=False,
            separate_weight_and_bias=False,
            num_data=N,
        )
        F.compute_kronecker_factors()
        return F

    return run


def cl_ggn(model, data, reduction: str = "sum"):
    from curvlinops import GGNLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    return GGNLinearOperator(
        NVT(model),
        nn.CrossEntropyLoss(reduction=reduction),
        params,
        data,
        check_deterministic=False,
        num_data=N,
    )


def tasks(model, data, linears) -> dict[str, Callable[[], Any]]:
    """Every task of the peak-memory runs, by name (products include nothing of their build)."""
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=gen())
    F_ours, G_cl = ours(model, data, "implicit", "exact")(), cl_ggn(model, data)
    return {
        "floor": floor_fn(model, data),
        "kfac mc (all params)": ours(model, data, "kfac"),
        "kfac mc (Linear)": ours(model, data, "kfac", params=linears),
        "curvlinops kfac mc (Linear)": cl_kfac(model, data, linears),
        "diag mc": ours(model, data, "diag"),
        "ekfac mc": ours(model, data, "ekfac"),
        "implicit F @ v": partial(torch.matmul, F_ours, v),
        "curvlinops GGN @ v": partial(G_cl.__matmul__, v),
        "minimal kfac (Linear)": partial(minimal_kfac, model, data, linears),
        "minimal F @ v": partial(minimal_fvp, model, data, v),
    }


# -- timing ----------------------------------------------------------------------------------------
def round_robin(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list]:
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def rel(a: Tensor, ref: Tensor) -> float:
    a, ref = a.detach().double().flatten(), ref.detach().double().flatten()
    return float((a - ref).norm() / ref.norm())


def agreement(model, data, linears) -> dict[str, str]:
    """Relative differences of products with a random v, ours against curvlinops (means over
    the N T tokens on both sides)."""
    lin_p = [p for m in linears for p in m.parameters()]
    out: dict[str, str] = {}
    ours_k = fl.fisher(
        model,
        data,
        structure="kfac",
        fisher_type="empirical",
        params=linears,
        likelihood=fl.Categorical(positions="mean"),
    )
    cl_k = cl_kfac(model, data, linears, "empirical", "mean")()
    u = torch.randn(sum(p.numel() for p in lin_p), generator=gen())
    out["kfac"] = f"empirical KFAC Fv (Linear) vs CL {rel(cl_k @ u, ours_k @ u):.0e}"
    ours_i = fl.fisher(
        model, data, structure="implicit", likelihood=fl.Categorical(positions="mean")
    )
    v = torch.randn(ours_i.shape[0], generator=gen())
    out["implicit"] = f"Fv vs CL {rel(cl_ggn(model, data, 'mean') @ v, ours_i @ v):.0e}"
    hand = minimal_fvp(model, data, v) / T  # the hand-written product, per token like ours_i
    out["implicit"] += f"; vs hand-written {rel(hand, ours_i @ v):.0e}"
    try:
        from curvlinops import EKFACLinearOperator

        twin = copy.deepcopy(model)  # a failed build leaves curvlinops' hooks on its model
        twin_p = [p for m in twin.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
        EKFACLinearOperator(
            NVT(twin),
            nn.CrossEntropyLoss(reduction="sum"),
            twin_p,
            data,
            fisher_type="mc",
            check_deterministic=False,
            separate_weight_and_bias=False,
            num_data=N,
        ).compute_kronecker_factors()
        out["ekfac"] = "curvlinops EKFAC ran (not timed)"
    except Exception as err:  # noqa: BLE001 - report what the peer says
        out["ekfac"] = f"curvlinops EKFAC: {type(err).__name__}: {str(err).splitlines()[0][:90]}"
    return out


# -- peak memory -----------------------------------------------------------------------------------
def hwm_kb() -> int:
    """This process's peak resident set size in kB (VmHWM: unlike ``ru_maxrss``, not inherited
    from the parent process through fork and exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def peak_child(task: str, exact_seqs: int) -> None:
    model, data, linears = setup()
    fns = tasks(model, data, linears)
    fns["diag exact"] = lambda x=data[0][0][:exact_seqs], y=data[0][1][:exact_seqs]: fl.fisher(
        model, (x, y), structure="diag"
    )
    fn = fns[task]
    before = hwm_kb()
    fn()
    after = hwm_kb()
    print(f"PEAK {before} {after}")  # kB on Linux


def peak(task: str, exact_seqs: int) -> str:
    cmd = [sys.executable, __file__, "--peak", task, "--exact-seqs", str(exact_seqs)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [s for s in out.stdout.splitlines() if s.startswith("PEAK")]
    if not line:
        return (
            f"failed ({out.stderr.strip().splitlines()[-1][:60] if out.stderr else out.returncode})"
        )
    before, after = (int(s) for s in line[0].split()[1:])
    return f"{after / 1e6:.2f} GB (+{max(after - before, 0) / 1e6:.2f} GB)"


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--exact-seqs", type=int, default=1)
    ap.add_argument("--no-peak", action="store_true")
    ap.add_argument("--peak", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.peak:
        return peak_child(args.peak, args.exact_seqs)
    model, data, linears = setup()
    fns = tasks(model, data, linears)
    p_all = sum(p.numel() for p in model.parameters())
    p_lin = sum(p.numel() for m in linears for p in m.parameters())
    print(
        f"nanoGPT 4x128, 4 heads, T={T}, V={V}: P = {p_all:,} ({p_lin:,} in {len(linears)} "
        f"Linear layers); {N} sequences in batches of {BATCH}",
        file=sys.stderr,
    )
    agree = agreement(model, data, linears)
    # (label, ours, curvlinops, hand-written minimum, note)
    rows = [
        ("kfac mc (1 sample, expand), all params", "kfac mc (all params)", None, None, ""),
        (
            "kfac mc (1 sample, expand), Linear params",
            "kfac mc (Linear)",
            "curvlinops kfac mc (Linear)",
            "minimal kfac (Linear)",
            agree["kfac"],
        ),
        ("diag mc (1 sample)", "diag mc", None, None, "curvlinops: no MC diagonal"),
        ("ekfac mc (1 sample)", "ekfac mc", None, None, agree["ekfac"]),
        (
            "implicit F @ v",
            "implicit F @ v",
            "curvlinops GGN @ v",
            "minimal F @ v",
            agree["implicit"],
        ),
    ]
    floor_times: list[float] = []
    results = []
    for label, ours_key, cl_key, min_key, note in rows:
        sel = {"ours": fns[ours_key], "floor": fns["floor"]}
        if cl_key:
            sel["cl"] = fns[cl_key]
        if min_key:
            sel["min"] = fns[min_key]
        times = round_robin(sel, args.repeats, args.warmup)
        floor_times.extend(times.pop("floor"))
        results.append(
            (
                label,
                {k: statistics.median(t) for k, t in times.items()},
                {k: min(t) for k, t in times.items()},
                note,
                ours_key,
                cl_key,
            )
        )
        print(f"  {label} done", file=sys.stderr, flush=True)
    # the exact diagonal: once, on a few sequences, scaled to N
    x, y = data[0][0][: args.exact_seqs], data[0][1][: args.exact_seqs]
    t0 = time.perf_counter()
    fl.fisher(model, (x, y), structure="diag")
    t_exact = (time.perf_counter() - t0) * N / args.exact_seqs
    floor = statistics.median(floor_times)
    print(
        f"\nfloor {floor * 1e3:.0f} ms (min {min(floor_times) * 1e3:.0f} ms, "
        f"max {max(floor_times) * 1e3:.0f} ms)\n"
    )
    print(
        "| task | fim_linops | / floor | curvlinops | / floor | ours / curvlinops | "
        "hand-written minimum / floor | peak RSS ours | peak RSS curvlinops | notes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, med, _mins, note, ok, ck in results:
        cl = (
            (
                f"{med['cl'] * 1e3:.0f} ms | {med['cl'] / floor:.2f}x | "
                f"{med['ours'] / med['cl']:.2f}x"
            )
            if "cl" in med
            else "n/a | | "
        )
        hand = f"{med['min'] / floor:.2f}x" if "min" in med else ""
        pk = "" if args.no_peak else peak(ok, args.exact_seqs)
        pc = "" if args.no_peak or not ck else peak(ck, args.exact_seqs)
        print(
            f"| {label} | {med['ours'] * 1e3:.0f} ms | {med['ours'] / floor:.2f}x | {cl} | "
            f"{hand} | {pk} | {pc} | {note} |"
        )
    pk = "" if args.no_peak else peak("diag exact", args.exact_seqs)
    print(
        f"| diag exact (estimate: {args.exact_seqs} sequences x {N // args.exact_seqs}) | "
        f"{t_exact:.0f} s | {t_exact / floor:.0f}x | n/a | | | | {pk} (on {args.exact_seqs} "
        f"sequences) | | {T * (V - 1)} columns per sequence |"
    )
    pf = "" if args.no_peak else peak("floor", args.exact_seqs)
    print(f"| floor | {floor * 1e3:.0f} ms | 1.00x | | | | | {pf} | | |")
    print(
        "\nRatios from the fastest rounds (ours / floor, curvlinops / floor): "
        + "; ".join(
            f"{r[0]}: {r[2]['ours'] / min(floor_times):.2f}"
            + (f"/{r[2]['cl'] / min(floor_times):.2f}" if "cl" in r[2] else "")
            for r in results
        )
    )
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
