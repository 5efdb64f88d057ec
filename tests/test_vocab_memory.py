"""The exact Fisher's per-example workspaces stay within ``max_bytes`` (engine/columns.py,
``per_example_workspace``; ``BatchResult.chunks``): the torch.func per-example gradients of a
tied LM head, the per-example gradients that the diagonal of a Linear used at several positions
forms, and the per-example gradients of every block (block_diag). Resident memory is too noisy
on a shared machine to test, so the proxy is deterministic: the bytes of each workspace tensor as
it is made (the torch.func gradients counted FUNC_COPIES times, the copies measured alive while
vjp under vmap makes them). And every structure equals the unchunked build and the float64
reference."""

from __future__ import annotations

import pytest
import torch
from seq_models import TinyGPT, lm_batch, sequence_fisher

import fim_linops as fl
from fim_linops.engine import functional
from fim_linops.engine.result import BatchResult
from fim_linops.engine.rules.linear import LinearRule

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

#: measured: the tied weight's per-example gradients live three times while torch.func makes
#: them (the head's, the embedding's, their sum); fim_linops.engine.columns.FUNC_COPIES
FUNC_COPIES = 3
#: float64: a few columns per chunk (about 10K numbers each); block_diag stores 4.8 MB itself
MAX_BYTES = {"diag": 400_000, "block_diag": 8_000_000}


def _data():
    """Tied head (torch.func: 100 x 8 tok.weight), Linear layers at two positions (the diagonal's
    per-example workspace), 16 sequences: a chunk of all examples is far over MAX_BYTES."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=100, d=8, context=2)
    ids, labels = lm_batch(n=16, t=2, vocab=100)
    return model, ids, labels


def _record(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The largest bytes each workspace reached, filled as the build runs."""
    seen = {"func": 0, "linear": 0, "blocks": 0}
    func, linear, blocks = (
        functional.FunctionalModel.per_example_grads,
        LinearRule.param_grads,
        BatchResult.all_block_grads,
    )

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    def func_grads(self, *args, **kwargs):
        out = func(self, *args, **kwargs)
        seen["func"] = max(seen["func"], FUNC_COPIES * nbytes(out.values()))
        return out

    def linear_grads(self, *args, **kwargs):
        out = linear(self, *args, **kwargs)
        seen["linear"] = max(seen["linear"], nbytes(out))
        return out

    def all_blocks(self, *args, **kwargs):
        out = blocks(self, *args, **kwargs)
        seen["blocks"] = max(seen["blocks"], nbytes(out))
        return out

    monkeypatch.setattr(functional.FunctionalModel, "per_example_grads", func_grads)
    monkeypatch.setattr(LinearRule, "param_grads", linear_grads)
    monkeypatch.setattr(BatchResult, "all_block_grads", all_blocks)
    return seen


@pytest.mark.parametrize("structure", ["diag", "block_diag"])
def test_per_example_workspaces_stay_within_max_bytes(
    monkeypatch: pytest.MonkeyPatch, structure: str
) -> None:
    model, ids, labels = _data()
    seen = _record(monkeypatch)
    limit = MAX_BYTES[structure]
    fl.fisher(model, (ids, labels), structure=structure, max_bytes=limit)
    assert seen["func"] > 0  # the tied head went through torch.func
    if structure == "diag":
        assert seen["linear"] > 0  # the Linear layers' diagonal formed per-example gradients
    else:
        assert seen["blocks"] > 0
    for what, size in seen.items():
        assert size <= limit, f"{what} workspace {size:,} bytes over max_bytes={limit:,}"


@pytest.mark.parametrize("structure", ["diag", "block_diag", "kfac", "ekfac"])
def test_every_structure_equals_the_unchunked_build_and_the_reference(structure: str) -> None:
    model, ids, labels = _data()
    ids, labels = ids[:6], labels[:6]  # a small reference
    limit = 6_000_000 if structure == "block_diag" else 20_000  # block_diag stores 5.6 MB
    with pytest.warns(RuntimeWarning, match="backward passes"):  # several column chunks
        small = fl.fisher(model, (ids, labels), structure=structure, max_bytes=limit)
    whole = fl.fisher(model, (ids, labels), structure=structure, max_bytes=None)
    v = torch.randn(small.shape[-1], 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(small @ v, whole @ v, rtol=1e-10, atol=1e-12)
    if structure in ("diag", "block_diag"):
        ref = sequence_fisher(model, ids, "categorical", labels != -100)
        torch.testing.assert_close(small.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)
        if structure == "block_diag":
            dense = small.to_dense()
            for e in fl.ParamLayout.from_model(model).blocks:
                block = slice(e.start, e.stop)
                torch.testing.assert_close(dense[block, block], ref[block, block])
