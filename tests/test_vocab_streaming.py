"""The exact Fisher of per-token outputs streams its columns: each chunk of back-propagated columns
is added into the statistics and freed before the next one (engine/columns.py). Every structure
built from many small chunks equals the one-pass build and the float64 reference; peak memory
stays bounded as the vocabulary grows; many passes warn, absurdly many raise, with the count and
fisher_type='mc'."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from seq_models import TinyGPT, lm_batch, sequence_fisher
from torch import nn

import fim_linops as fl
from fim_linops.engine import columns as columns_mod
from fim_linops.engine import engine as engine_mod

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def _force_chunks(monkeypatch: pytest.MonkeyPatch, step: int) -> list[int]:
    """Back-propagate ``step`` columns per pass whatever max_bytes says; returns the list of
    chunk sizes, filled as the engine runs."""
    sizes: list[int] = []
    inner = columns_mod.backward_chunk

    def counted(f, outputs, v, last):
        sizes.append(v.shape[0])
        return inner(f, outputs, v, last)

    monkeypatch.setattr(engine_mod, "column_step", lambda *args: step)
    monkeypatch.setattr(engine_mod, "backward_chunk", counted)
    return sizes


class SeqMix(nn.Module):
    """(N, T) token ids -> (N, T, 7) logits: embedding, per-position MLP, a causal running mean
    that mixes the positions, LayerNorm, head. Every layer ruled (fast), columns of one position
    reach the others."""

    def __init__(self, vocab: int = 7):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.fc = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(self.emb(ids)))  # (N, T, 5)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.head(self.ln(h.cumsum(1) / steps))


def _data(model_cls=SeqMix):
    torch.manual_seed(0)
    model = model_cls()
    ids, labels = lm_batch(n=4)
    return model, [(ids[:2], labels[:2]), (ids[2:], labels[2:])], ids, labels


K = 5 * 6  # T * (C - 1) columns per batch of lm_batch()
CASES = [
    ("dense", {}, 4),
    ("block_diag", {}, 4),
    ("diag", {}, 4),
    ("quasi_diag", {}, 4),
    ("lowrank", {"rank": 5}, 4),
    ("kfac", {}, 4),
    ("kfac", {"kfac_approx": "reduce"}, 4),
    ("ekfac", {}, 4),
    ("kron_sum", {"rank": 2, "params": ["head.weight", "head.bias"]}, 4),
    ("implicit", {}, 4),
    ({"fc": "kfac", "head": "ekfac", "default": "diag"}, {}, 4),
    ({"head": "kfac", "default": "block_diag"}, {}, 4),
    ("diag", {}, 1),
    ("kfac", {}, 1),
    ("ekfac", {}, 1),
    ("dense", {}, 1),
]


@pytest.mark.parametrize(
    ("structure", "kw", "step"), CASES, ids=[f"{c[0]}{c[1]}-{c[2]}" for c in CASES]
)
def test_every_structure_from_column_chunks_equals_the_one_pass_build(
    monkeypatch: pytest.MonkeyPatch, structure, kw: dict, step: int
) -> None:
    model, data, ids, labels = _data()
    whole = fl.fisher(model, data, structure=structure, **kw).to_dense()
    sizes = _force_chunks(monkeypatch, step)
    F = fl.fisher(model, data, structure=structure, **kw)
    if structure != "implicit":  # implicit products use H v, not columns
        assert max(sizes) == step and len(sizes) >= 2 * -(-K // step), sizes
    torch.testing.assert_close(F.to_dense(), whole, rtol=1e-10, atol=1e-12)
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    if structure in ("diag", "block_diag", "quasi_diag"):
        torch.testing.assert_close(F.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)
    elif structure in ("dense", "implicit"):
        torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)
    elif structure == "lowrank":  # the top eigenvalues of the reference
        lam = torch.linalg.eigvalsh(ref).flip(0)[:5]
        torch.testing.assert_close(torch.linalg.eigvalsh(F.to_dense()).flip(0)[:5], lam)


@pytest.mark.parametrize("structure", ["dense", "diag", "kfac", "ekfac"])
def test_roots_made_column_by_column_equal_the_roots_made_at_once(
    monkeypatch: pytest.MonkeyPatch, structure: str
) -> None:
    """Small outputs form all exact columns at once (``RootColumns.whole``), vocabulary-size
    ones column range by column range (``RootColumns.chunk``): the same operator, padded
    positions included, and the dense one equal to the reference."""
    model, data, ids, labels = _data()
    at_once = fl.fisher(model, data, structure=structure)
    monkeypatch.setattr(columns_mod, "WHOLE_NUMEL", 0)  # every size takes the range path
    sizes = _force_chunks(monkeypatch, 4)
    by_range = fl.fisher(model, data, structure=structure)
    assert len(sizes) >= 2 * -(-K // 4), sizes
    torch.testing.assert_close(by_range.to_dense(), at_once.to_dense(), rtol=1e-10, atol=1e-12)
    if structure == "dense":
        ref = sequence_fisher(model, ids, "categorical", labels != -100)
        torch.testing.assert_close(by_range.to_dense(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["dense", "diag"])
def test_chunked_transformer_with_a_tied_head_matches_the_reference(
    monkeypatch: pytest.MonkeyPatch, structure: str
) -> None:
    """Attention, LayerNorm and the tied head/embedding weight through torch.func, in chunks of
    7 columns (across position boundaries: 6 per position)."""
    model, data, ids, labels = _data(TinyGPT)
    sizes = _force_chunks(monkeypatch, 7)
    F = fl.fisher(model, data, structure=structure)
    assert len(sizes) == 2 * -(-K // 7)
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    if structure == "diag":
        torch.testing.assert_close(F.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_of_a_per_token_linear_layer_from_chunks_matches_its_factors(
    monkeypatch: pytest.MonkeyPatch, approx: str
) -> None:
    """One Linear layer applied per position, f_nt = W a_nt + b: the gradient of column (t, k) is
    S_nt[:, k] [a_nt; 1]^T, so G = 1/N sum_{n,t} H_nt (both conventions), A = 1/(N T) sum_{n,t}
    [a;1][a;1]^T ("expand") or 1/N sum_n abar_n abar_n^T with abar_n = mean_t [a_nt; 1]
    ("reduce"). The input factor must be added once per batch, not once per column chunk."""
    torch.manual_seed(0)
    model = nn.Linear(3, 6)
    x, y = torch.randn(3, 4, 3), torch.randint(0, 6, (3, 4))
    sizes = _force_chunks(monkeypatch, 3)
    F = fl.fisher(model, (x, y), structure="kfac", kfac_approx=approx)
    assert len(sizes) == -(-4 * 5 // 3)
    p = torch.softmax(model(x).detach(), -1)  # (n, t, c)
    g = (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]).sum((0, 1)) / 3
    a1 = torch.cat([x, torch.ones(3, 4, 1)], -1)  # (n, t, i+1)
    if approx == "expand":
        a = torch.einsum("nti,ntj->ij", a1, a1) / 12
    else:
        a = torch.einsum("ni,nj->ij", a1.mean(1), a1.mean(1)) / 3
    rm = torch.kron(g, a)  # row-major [W | b]: index o * 4 + i
    order = [o * 4 + i for o in range(6) for i in range(3)] + [o * 4 + 3 for o in range(6)]
    torch.testing.assert_close(F.to_dense(), rm[order][:, order], rtol=1e-10, atol=1e-12)


def test_mc_columns_recorded_for_a_second_pass_survive_chunking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EKFAC's second pass reuses the MC samples of the first, also when they came in chunks."""
    model, data, _, _ = _data()
    lin = [model.fc.weight, model.fc.bias, model.head.weight]

    def build() -> torch.Tensor:
        gen = torch.Generator().manual_seed(3)
        return fl.fisher(
            model, data, "categorical", "ekfac", "mc", mc_samples=5, params=lin, generator=gen
        ).to_dense()

    whole = build()
    sizes = _force_chunks(monkeypatch, 2)
    torch.testing.assert_close(build(), whole, rtol=1e-10, atol=1e-12)
    assert sizes and max(sizes) == 2


def test_many_backward_passes_warn_and_absurdly_many_raise_with_the_count() -> None:
    model, data, _, _ = _data()
    with pytest.warns(RuntimeWarning, match=r"30 columns per batch.*backward passes.*'mc'"):
        fl.fisher(model, data, structure="diag", max_bytes=5_000)
    with pytest.raises(ValueError, match=r"30 backward passes.*over 10.*fisher_type='mc'"):
        old = columns_mod.MAX_PASSES
        columns_mod.MAX_PASSES = 10
        try:
            fl.fisher(model, data, structure="diag", max_bytes=1)
        finally:
            columns_mod.MAX_PASSES = old


SCRIPT = r"""
import json, resource, sys, torch, warnings, fim_linops as fl
from torch import nn
torch.manual_seed(0)
torch.set_num_threads(1)
v = int(sys.argv[1])
model = nn.Sequential(nn.Embedding(v, 16), nn.Tanh(), nn.Linear(16, v))
ids = torch.randint(0, v, (16, 1))
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak_mb()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    F = fl.fisher(model, (ids, ids), structure="diag", max_bytes=16 * 2**20)
assert bool(torch.isfinite(F.diagonal()).all())
print(json.dumps({"peak_mb": peak_mb() - base, "columns_mb": (v - 1) * 16 * v * 4 / 2**20}))
"""


def _peak(v: int) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(v)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_peak_memory_of_the_exact_fisher_stays_bounded_as_the_vocabulary_grows() -> None:
    """(16, 1, V) logits: all V - 1 columns at once would take 16 V^2 floats (1 GB at V = 4000);
    in 16 MiB chunks the peak barely moves from V = 500 to V = 4000."""
    small, large = _peak(500), _peak(4000)
    assert large["columns_mb"] > 900
    assert large["peak_mb"] - small["peak_mb"] < 80, (small, large)  # measured: 20 MB
    assert large["peak_mb"] < large["columns_mb"] / 4, large
