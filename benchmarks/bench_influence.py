r"""EK-FAC influence scores of fim_linops against kronfluence 1.0.1 on the same model and data.

Run from the repository root (CPU)::

    python benchmarks/bench_influence.py            # digits MLP, 3 repeats
    python benchmarks/bench_influence.py --quick    # 1 repeat (a smoke run, noisier)

Model and data: the MLP 64-256-256-10 of ``benchmarks/models.py`` trained (Adam, 20 epochs,
seed 0) on the first 1437 of sklearn's ``load_digits`` (inputs scaled to [0, 1]); the queries are
the 100 next (held-out) digits. Batches of 256 for both tools, float32.

Matching settings: EK-FAC on every Linear layer (weight and bias in one Kronecker block, as both
tools do), the **empirical** Fisher (the data's labels: kronfluence ``use_empirical_fisher=True``,
fim_linops ``fisher_type="empirical"``), so both fit the same factors without sampling noise;
the same absolute damping 1e-3 added to the EK-FAC eigenvalues (kronfluence
``damping_factor=1e-3``, fim_linops ``damping=1e-3``, exact in the eigenbasis for both); scores
of the summed cross-entropy of each example (kronfluence's measurement = the query's loss).
kronfluence computes its eigendecompositions in float64 (its default), fim_linops in the model's
float32.

Measured per tool, each in a fresh process (``spawn``), the median of the repeats:
``factor`` (covariances, eigendecompositions, eigenvalue refit: kronfluence ``fit_all_factors``,
fim_linops ``fl.fisher(structure="ekfac")``), ``score`` (pairwise scores (100, 1437):
``compute_pairwise_scores`` / ``fl.influence(structure=op)``), ``total``; ``peak MiB``: the rise
of the process's peak resident memory over its level after the model and data were made (Linux
``ru_maxrss``; a coarse CPU measure: it includes allocator slack), and the Spearman rank
correlation of the two score matrices (flattened) and its median over the query rows.
kronfluence writes its factors and scores to a temporary folder (its design); that disk I/O is
part of its times.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DAMPING = 1e-3
BATCH = 256
N_TRAIN, N_QUERY = 1437, 100
GPT_T, GPT_TRAIN, GPT_QUERY, GPT_BATCH = 32, 256, 16, 32


def digits_setup() -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """The trained MLP and the (train, query) datasets, identical in every process."""
    from models import mlp
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = x[:N_TRAIN], y[:N_TRAIN]
    for _ in range(20):
        for i in range(0, N_TRAIN, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i : i + 64]), yt[i : i + 64]).backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    q = slice(N_TRAIN, N_TRAIN + N_QUERY)
    return model, TensorDataset(xt, yt), TensorDataset(x[q], y[q])


def gpt_setup() -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """The nanoGPT-style character transformer of ``fim_linops.examples.nanogpt`` (2 layers,
    d = 64, 4 heads, context 32, untied head), trained 200 Adam steps on 256 windows of the
    shipped text; queries: the 16 next windows. Labels (N, T): the next character."""
    from fim_linops.examples.nanogpt import NanoGPT, char_dataset

    ids, labels, vocab = char_dataset(block_size=GPT_T)
    torch.manual_seed(0)
    model = NanoGPT(
        vocab_size=len(vocab), block_size=GPT_T, n_layer=2, n_head=4, n_embd=64, tie_weights=False
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = ids[:GPT_TRAIN], labels[:GPT_TRAIN]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        b = torch.randint(0, GPT_TRAIN, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt[b]).flatten(0, 1), yt[b].flatten()).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    q = slice(GPT_TRAIN, GPT_TRAIN + GPT_QUERY)
    return model, TensorDataset(xt, yt), TensorDataset(ids[q], labels[q])


SETUPS = {"digits": digits_setup, "gpt": gpt_setup}


def linear_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the nn.Linear layers: kronfluence's tracked modules, for both tools."""
    return [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_fim_linops(setup: str, out: Path) -> None:
    import fim_linops as fl

    torch.set_num_threads(2)
    model, train, query = SETUPS[setup]()
    params = linear_params(model)
    train_loader = DataLoader(train, batch_size=BATCH if setup == "digits" else GPT_BATCH)
    query_batch = query.tensors
    base = _peak_mib()
    t0 = time.perf_counter()
    op = fl.fisher(model, train_loader, structure="ekfac", fisher_type="empirical", params=params)
    t1 = time.perf_counter()
    scores = fl.influence(
        model, train_loader, query_batch, structure=op, damping=DAMPING, params=params
    )
    t2 = time.perf_counter()
    torch.save({"factor": t1 - t0, "score": t2 - t1, "peak": _peak_mib() - base, "s": scores}, out)


def run_kronfluence(setup: str, out: Path) -> None:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    torch.set_num_threads(2)

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
            x, y = batch  # (N, C) logits or (N, T, C) per-token logits
            logits = model(x).flatten(0, -2)
            y = y.flatten()
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1), 1).flatten()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
            x, y = batch
            return nn.functional.cross_entropy(
                model(x).flatten(0, -2), y.flatten(), reduction="sum"
            )

    model, train, query = SETUPS[setup]()
    batch = BATCH if setup == "digits" else GPT_BATCH
    n_query = len(query)
    base = _peak_mib()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        task = Classification()
        model = prepare_model(model, task)
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=tmp)
        analyzer.fit_all_factors(
            "ekfac",
            train,
            per_device_batch_size=batch,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
            overwrite_output_dir=True,
        )
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores",
            "ekfac",
            query,
            train,
            per_device_query_batch_size=n_query,
            per_device_train_batch_size=batch,
            score_args=ScoreArguments(damping_factor=DAMPING),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        t2 = time.perf_counter()
    torch.save({"factor": t1 - t0, "score": t2 - t1, "peak": _peak_mib() - base, "s": scores}, out)


def _in_fresh_process(fn, setup: str, tmp: Path) -> dict:  # type: ignore[no-untyped-def, type-arg]
    out = tmp / f"{fn.__name__}_{setup}.pt"
    p = mp.get_context("spawn").Process(target=fn, args=(setup, out))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed (exit code {p.exitcode})")
    return torch.load(out)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def report(setup: str, repeats: int) -> None:
    """Run both tools ``repeats`` times on ``setup`` and print its table."""
    runs: dict[str, list[dict]] = {"fim_linops": [], "kronfluence": []}  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            runs["fim_linops"].append(_in_fresh_process(run_fim_linops, setup, Path(tmp)))
            runs["kronfluence"].append(_in_fresh_process(run_kronfluence, setup, Path(tmp)))
    med = {
        tool: {k: statistics.median(r[k] for r in rs) for k in ("factor", "score", "peak")}
        for tool, rs in runs.items()
    }
    ours = runs["fim_linops"][-1]["s"].double().numpy()
    theirs = runs["kronfluence"][-1]["s"].double().numpy()
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    rho = spearman(ours.ravel(), theirs.ravel())
    rho_rows = statistics.median(spearman(ours[i], theirs[i]) for i in range(ours.shape[0]))
    what = {
        "digits": f"digits MLP 64-256-256-10, {N_TRAIN} train x {N_QUERY} queries, batches {BATCH}",
        "gpt": f"char nanoGPT 2x64, T={GPT_T}, {GPT_TRAIN} train x {GPT_QUERY} queries, "
        f"batches {GPT_BATCH}, Linear layers",
    }[setup]
    print(f"\n{what}; EK-FAC, empirical Fisher, damping {DAMPING}, CPU, median of {repeats}")
    print(f"{'tool':<12} {'factor s':>9} {'score s':>9} {'total s':>9} {'peak MiB':>9}")
    for tool, m in med.items():
        total = m["factor"] + m["score"]
        print(f"{tool:<12} {m['factor']:9.3f} {m['score']:9.3f} {total:9.3f} {m['peak']:9.1f}")
    f, k = med["fim_linops"], med["kronfluence"]
    ratio = (f["factor"] + f["score"]) / (k["factor"] + k["score"])
    print(f"total time fim_linops / kronfluence: {ratio:.2f} (target <= 0.5)")
    print(
        f"Spearman rank correlation: {rho:.4f} overall, {rho_rows:.4f} median per query "
        "(target > 0.99)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    parser.add_argument("--model", choices=["digits", "gpt", "all"], default="all")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    for setup in ("digits", "gpt") if args.model == "all" else (args.model,):
        report(setup, repeats)


if __name__ == "__main__":
    main()
