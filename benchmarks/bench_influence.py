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


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_fim_linops(out: Path) -> None:
    import fim_linops as fl

    torch.set_num_threads(2)
    model, train, query = digits_setup()
    train_loader = DataLoader(train, batch_size=BATCH)
    query_batch = query.tensors
    base = _peak_mib()
    t0 = time.perf_counter()
    op = fl.fisher(model, train_loader, structure="ekfac", fisher_type="empirical")
    t1 = time.perf_counter()
    scores = fl.influence(model, train_loader, query_batch, structure=op, damping=DAMPING)
    t2 = time.perf_counter()
    torch.save({"factor": t1 - t0, "score": t2 - t1, "peak": _peak_mib() - base, "s": scores}, out)


def run_kronfluence(out: Path) -> None:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    torch.set_num_threads(2)

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1), 1).flatten()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    model, train, query = digits_setup()
    base = _peak_mib()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        task = Classification()
        model = prepare_model(model, task)
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=tmp)
        analyzer.fit_all_factors(
            "ekfac",
            train,
            per_device_batch_size=BATCH,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
            overwrite_output_dir=True,
        )
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores",
            "ekfac",
            query,
            train,
            per_device_query_batch_size=N_QUERY,
            per_device_train_batch_size=BATCH,
            score_args=ScoreArguments(damping_factor=DAMPING),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        t2 = time.perf_counter()
    torch.save({"factor": t1 - t0, "score": t2 - t1, "peak": _peak_mib() - base, "s": scores}, out)


def _in_fresh_process(fn, tmp: Path) -> dict:  # type: ignore[no-untyped-def, type-arg]
    out = tmp / f"{fn.__name__}.pt"
    p = mp.get_context("spawn").Process(target=fn, args=(out,))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed (exit code {p.exitcode})")
    return torch.load(out)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    runs: dict[str, list[dict]] = {"fim_linops": [], "kronfluence": []}  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            runs["fim_linops"].append(_in_fresh_process(run_fim_linops, Path(tmp)))
            runs["kronfluence"].append(_in_fresh_process(run_kronfluence, Path(tmp)))
    med = {
        tool: {k: statistics.median(r[k] for r in rs) for k in ("factor", "score", "peak")}
        for tool, rs in runs.items()
    }
    ours = runs["fim_linops"][-1]["s"].double().numpy()
    theirs = runs["kronfluence"][-1]["s"].double().numpy()
    assert ours.shape == theirs.shape == (N_QUERY, N_TRAIN), (ours.shape, theirs.shape)
    rho = spearman(ours.ravel(), theirs.ravel())
    rho_rows = statistics.median(spearman(ours[i], theirs[i]) for i in range(N_QUERY))
    print(f"digits MLP 64-256-256-10, {N_TRAIN} train x {N_QUERY} queries, EK-FAC, empirical")
    print(f"Fisher, damping {DAMPING}, batches of {BATCH}, CPU, median of {repeats}")
    print(f"{'tool':<12} {'factor s':>9} {'score s':>9} {'total s':>9} {'peak MiB':>9}")
    for tool, m in med.items():
        total = m["factor"] + m["score"]
        print(f"{tool:<12} {m['factor']:9.3f} {m['score']:9.3f} {total:9.3f} {m['peak']:9.1f}")
    f, k = med["fim_linops"], med["kronfluence"]
    ratio = (f["factor"] + f["score"]) / (k["factor"] + k["score"])
    print(f"total time fim_linops / kronfluence: {ratio:.2f} (target <= 0.5)")
    print(
        f"Spearman rank correlation: {rho:.4f} overall, {rho_rows:.4f} median per query (target > 0.99)"
    )


if __name__ == "__main__":
    main()
