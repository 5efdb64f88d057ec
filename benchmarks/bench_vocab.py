"""Vocabulary-size outputs and half precision on a small causal transformer (issue 18, items 3, 4).

Part 1 (``--part vocab``): time and peak memory of ``fisher_type="exact"`` against ``"mc"``
(1 sample) for the diagonal and KFAC Fisher at V = 65, 1,000 and 8,000. The exact Fisher
back-propagates V - 1 columns per kept position (in chunks within ``max_bytes``), so its cost grows
with V; the MC Fisher back-propagates one column per sample whatever V.

Part 2 (``--part bf16``): relative error against a float64 reference (the same model in float64)
of the diagonal, of KFAC products F v and of implicit (exact) products F v, for the model used as
it is in bf16 and in float32 (statistics accumulate in float32 in both).

Model: token + position embeddings, ``--layers`` pre-LayerNorm blocks (causal attention built from
nn.Linear, MLP), LM head tied to the token embedding; width 32, 2 heads, context 16; 8 sequences
with the last quarter of sequence 0 padded (labels -100). CPU, ``torch.set_num_threads(2)``.
Times are the median of ``--repeats`` runs after one warm-up; peak memory is the resident-set
high-water mark above the start of the build (``fim_linops.compare.peak_memory``).

    python benchmarks/bench_vocab.py                    # both parts
    python benchmarks/bench_vocab.py --part vocab --vocab 65 1000
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
from torch import Tensor, nn

import fim_linops as fl
from fim_linops.compare import peak_memory


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: Tensor) -> Tensor:
        n, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        # n: sequence, h: head, t/s: position, e: head feature
        q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        return h + self.out(torch.nn.functional.gelu(self.fc(self.ln2(h))))


class CharGPT(nn.Module):
    """(N, T) token ids -> (N, T, V) logits."""

    def __init__(self, vocab: int, d: int = 32, heads: int = 2, context: int = 16, layers: int = 1):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.ln_f(self.blocks(h)))


def make(vocab: int, layers: int, n: int = 8, t: int = 16) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = CharGPT(vocab, layers=layers, context=t).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = torch.randint(0, vocab, (n, t), generator=g)
    labels[0, -t // 4 :] = -100
    return model, ids, labels


def timed(fn, repeats: int) -> tuple[float, int]:
    """Median seconds over ``repeats`` runs after one warm-up, and the peak bytes of one run;
    with ``repeats=1``, one run gives both (no warm-up)."""
    if repeats == 1:
        with peak_memory(torch.device("cpu")) as mem:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        return dt, mem["peak"]
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    with peak_memory(torch.device("cpu")) as mem:
        fn()
    return statistics.median(times), mem["peak"]


def part_vocab(
    vocabs: list[int],
    layers: int,
    repeats: int,
    n: int = 8,
    t: int = 16,
    big: int = 8000,
    max_bytes: int = 8 * 2**30,
) -> None:
    """The table; the exact Fisher runs once (no warm-up) from V = ``big`` on, its columns in
    chunks within ``max_bytes``."""
    print(f"{n} sequences of {t} positions, max_bytes={max_bytes:,}")
    print("| V | structure | exact (s) | MC, 1 sample (s) | exact / MC | exact peak | MC peak |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for v in vocabs:
        model, ids, labels = make(v, layers, n, t)
        for s in ("diag", "kfac"):
            row = {}
            for ft in ("exact", "mc"):
                gen = torch.Generator().manual_seed(0)

                def build(ft=ft, s=s, gen=gen, model=model, data=(ids, labels)):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the exact Fisher's many-passes warning
                        return fl.fisher(
                            model,
                            data,
                            structure=s,
                            fisher_type=ft,
                            generator=gen,
                            max_bytes=max_bytes,
                        )

                row[ft] = timed(build, 1 if (ft == "exact" and v >= big) else repeats)
            (te, me), (tm, mm) = row["exact"], row["mc"]
            print(
                f"| {v:,} | {s} | {te:.3g} | {tm:.3g} | {te / tm:.0f}x | "
                f"{me / 2**20:.0f} MiB | {mm / 2**20:.0f} MiB |",
                flush=True,
            )


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def part_bf16(layers: int, vocab: int = 65) -> None:
    model, ids, labels = make(vocab, layers)
    data = (ids, labels)
    m64 = CharGPT(vocab, layers=layers).eval()
    m64.load_state_dict(model.state_dict())
    m64.double()
    p = sum(q.numel() for q in model.parameters())
    vs = torch.randn(p, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = {
        "diag": fl.fisher(m64, data, structure="diag").diagonal(),
        "kfac": fl.fisher(m64, data, structure="kfac") @ vs,
        "implicit": fl.fisher(m64, data, structure="implicit") @ vs,
    }
    print("| quantity | float32 model | bf16 model |")
    print("|---|---:|---:|")
    errs: dict[str, list[float]] = {k: [] for k in ref}
    for dtype in (torch.float32, torch.bfloat16):
        m = CharGPT(vocab, layers=layers).eval()
        m.load_state_dict(model.state_dict())
        m.to(dtype)
        v = vs.float()
        errs["diag"].append(rel(fl.fisher(m, data, structure="diag").diagonal(), ref["diag"]))
        errs["kfac"].append(rel(fl.fisher(m, data, structure="kfac") @ v, ref["kfac"]))
        errs["implicit"].append(rel(fl.fisher(m, data, structure="implicit") @ v, ref["implicit"]))
    names = {"diag": "diagonal", "kfac": "KFAC products F v", "implicit": "implicit products F v"}
    for k, (e32, e16) in errs.items():
        print(f"| {names[k]} | {e32:.1e} | {e16:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["vocab", "bf16", "both"], default="both")
    ap.add_argument("--vocab", type=int, nargs="+", default=[65, 1000, 8000])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sequences", type=int, default=8, help="sequences (one batch)")
    ap.add_argument("--context", type=int, default=16, help="positions per sequence")
    ap.add_argument(
        "--big", type=int, default=8000, help="from this V on, the exact Fisher runs once"
    )
    ap.add_argument(
        "--max-bytes", type=int, default=8 * 2**30, help="fl.fisher(max_bytes=): column chunks"
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads\n")
    if args.part in ("vocab", "both"):
        part_vocab(
            args.vocab,
            args.layers,
            args.repeats,
            args.sequences,
            args.context,
            args.big,
            args.max_bytes,
        )
        print()
    if args.part in ("bf16", "both"):
        part_bf16(args.layers)


if __name__ == "__main__":
    main()
