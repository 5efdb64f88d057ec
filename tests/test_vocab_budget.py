"""The exact Fisher of a vocabulary-size output within ``max_bytes`` for every structure that forms
per-example tensors from the column chunks (engine/columns.py, ``per_example_workspace``;
``BatchResult.slices``): EKFAC's projections, the Kronecker sums' products, the quasi-diagonal's
cross terms, the low-rank SVD route's stacked gradients, and the token embedding's per-example
gradients (an untied embedding at several positions). Resident memory is too noisy on a shared
machine to test, so the proxy is deterministic: the bytes of each workspace tensor as it is made.
And every structure built in many small column chunks equals the unchunked build."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import fim_linops as fl
from fim_linops.engine import columns as columns_mod
from fim_linops.engine import engine as engine_mod
from fim_linops.engine.result import BatchResult
from fim_linops.engine.rules.embedding import EmbeddingRule
from fim_linops.operators.kron import KronSpec

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

#: float64: a few columns per chunk (the embedding's per-example gradient is 15 KB a column)
MAX_BYTES = 200_000


class WideEmbeddingLM(nn.Module):
    """(N, T) token ids -> (N, T, V) logits, untied. The token embedding (V x 64, ruled, at every
    position) is the widest layer: its per-example gradients (K, n, 64 V) are the statistics'
    largest workspace; LayerNorm (an exact block under kfac/ekfac/kron_sum), a Linear, a causal
    running mean that mixes the positions, a Linear head with a bias (the quasi-diagonal's cross
    terms)."""

    def __init__(self, vocab: int = 30, d: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4)
        self.head = nn.Linear(4, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.fc(self.ln(self.tok(ids))))  # (N, T, 4)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.head(h.cumsum(1) / steps)


def _data(n: int = 1) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """The model (seed 0) and ``n`` sequences of 3 tokens: one sequence, so that the examples'
    chunks cannot shrink below the columns' chunk."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (n, 3), generator=g)
    labels = torch.randint(0, 30, (n, 3), generator=g)
    return WideEmbeddingLM(), (ids, labels)


def _record(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The largest bytes each workspace reached, and the backward passes, filled as the build
    runs: "grads" the per-example gradients (K, n, p) of a ruled block or of all blocks, "slice"
    the matrices (s, groups, rows, cols) that EKFAC and the Kronecker sums make from them."""
    seen = {"grads": 0, "slice": 0, "passes": 0}
    block, blocks, emb, to_mat = (
        BatchResult.block_grads,
        BatchResult.all_block_grads,
        EmbeddingRule.param_grads,
        KronSpec.to_mat,
    )
    backward = columns_mod.backward_chunk

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    def block_grads(self, *args):
        out = block(self, *args)
        seen["grads"] = max(seen["grads"], nbytes([out]))
        return out

    def all_block_grads(self, *args):
        out = blocks(self, *args)
        seen["grads"] = max(seen["grads"], nbytes(out))
        return out

    def emb_grads(self, *args):
        out = emb(self, *args)
        seen["grads"] = max(seen["grads"], nbytes(out))
        return out

    def mats(self, x):
        out = to_mat(self, x)
        seen["slice"] = max(seen["slice"], nbytes([out]))
        return out

    def counted(f, outputs, v, last):
        seen["passes"] += 1
        return backward(f, outputs, v, last)

    monkeypatch.setattr(BatchResult, "block_grads", block_grads)
    monkeypatch.setattr(BatchResult, "all_block_grads", all_block_grads)
    monkeypatch.setattr(EmbeddingRule, "param_grads", emb_grads)
    monkeypatch.setattr(KronSpec, "to_mat", mats)
    monkeypatch.setattr(engine_mod, "backward_chunk", counted)
    return seen


CASES = [
    ("diag", {}),
    ("ekfac", {}),
    ("kron_sum", {"rank": 1}),
    ("quasi_diag", {}),
    ("lowrank", {"rank": 3}),
]


@pytest.mark.parametrize(("structure", "kw"), CASES, ids=[c[0] for c in CASES])
def test_workspaces_of_an_untied_embedding_stay_within_max_bytes(
    monkeypatch: pytest.MonkeyPatch, structure: str, kw: dict
) -> None:
    model, data = _data()
    seen = _record(monkeypatch)
    fl.fisher(model, data, structure=structure, max_bytes=MAX_BYTES, **kw)
    assert seen["passes"] > 4, seen  # chunks of a few of the T (V - 1) = 87 columns
    assert 0 < seen["grads"] <= MAX_BYTES, f"per-example gradients {seen['grads']:,} bytes"
    if structure in ("ekfac", "kron_sum"):  # the embedding's projections, in slices
        assert 0 < seen["slice"] <= MAX_BYTES // 8, f"slice {seen['slice']:,} bytes"


@pytest.mark.parametrize(
    ("structure", "kw"),
    [*CASES, ("kfac", {}), ({"tok": "ekfac", "default": "kron_sum"}, {"rank": 1})],
    ids=[*(c[0] for c in CASES), "kfac", "mix"],
)
def test_budgeted_build_equals_the_unbudgeted_build(structure, kw: dict) -> None:
    model, data = _data(n=2)
    with pytest.warns(RuntimeWarning, match="backward passes"):  # several column chunks
        small = fl.fisher(model, data, structure=structure, max_bytes=MAX_BYTES, **kw)
    whole = fl.fisher(model, data, structure=structure, max_bytes=None, **kw)
    v = torch.randn(small.shape[-1], 3, generator=torch.Generator().manual_seed(1))
    if structure == "lowrank":  # eigenvectors up to sign: compare the operators
        torch.testing.assert_close(small.to_dense(), whole.to_dense(), rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(small @ v, whole @ v, rtol=1e-10, atol=1e-12)


def test_influence_keeps_its_per_example_gradients_within_max_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fl.influence(max_bytes=...)``: the exact Fisher's column chunks and the training pass's
    per-example gradients (1, n, P) within the budget, and the scores those of an unbudgeted run."""
    model, (ids, labels) = _data(n=12)  # 12 x P x 8 bytes: over MAX_BYTES at once
    train, query = (ids, labels), (ids[:2], labels[:2].flip(1))
    whole = fl.influence(model, train, query, structure="ekfac", max_bytes=None)
    top = fl.top_influences(model, train, query, k=2, structure="ekfac", max_bytes=None)
    seen = _record(monkeypatch)
    small = fl.influence(model, train, query, structure="ekfac", max_bytes=MAX_BYTES)
    assert seen["passes"] > 4, seen
    assert 0 < seen["grads"] <= MAX_BYTES, f"per-example gradients {seen['grads']:,} bytes"
    torch.testing.assert_close(small, whole, rtol=1e-10, atol=1e-12)
    small_top = fl.top_influences(model, train, query, k=2, structure="ekfac", max_bytes=MAX_BYTES)
    torch.testing.assert_close(small_top[0], top[0], rtol=1e-10, atol=1e-12)
    assert torch.equal(small_top[1], top[1])
    self_small = fl.self_influence(model, train, structure="ekfac", max_bytes=MAX_BYTES)
    self_whole = fl.self_influence(model, train, structure="ekfac", max_bytes=None)
    torch.testing.assert_close(self_small, self_whole, rtol=1e-10, atol=1e-12)
