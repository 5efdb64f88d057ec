"""Layers whose calls are shared by the examples of a batch (a position embedding called on
arange(T) and broadcast over the batch, as GPT-2's ``wpe``): KFAC "expand" takes a layer's rows as
they come, which must not mix the examples. Every structure is checked against float64 references
and for batching invariance (one batch of 4 == two batches of 2); the reshaped (B, 2, D) -> (2B, D)
rows that "expand" accepts stay accepted. Also: likelihood reprs, and operators that never track
gradients (a torch.func layer's statistics once carried the other parameters' graph)."""

from __future__ import annotations

import warnings

import models
import pytest
import torch
from seq_models import sequence_fisher
from test_rules_transformers import PairsFlat
from torch import Tensor, nn

import fim_linops as fl
from fim_linops.fisher import fisher_one_pass
from fim_linops.layout import ParamLayout
from fim_linops.options import BuildOptions
from fim_linops.sharding import fisher_sharded
from fim_linops.structures import Structure

pytestmark = pytest.mark.usefixtures("float64_default")

V, T, D, H = 5, 4, 3, 4


class SharedPositions(nn.Module):
    """Token + position embeddings (the positions' call shared by the batch: arange(T)[None] of
    shape (1, T) when ``lead``, else arange(T) of shape (T,)), a causal running mean (so every
    position embedding reaches later outputs), tanh MLP, LM head: (N, T) ids -> (N, T, V)."""

    def __init__(self, lead: bool = True):
        super().__init__()
        self.lead = lead
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.fc = nn.Linear(D, H)
        self.head = nn.Linear(H, V)

    def forward(self, ids: Tensor) -> Tensor:
        t = torch.arange(ids.shape[1], device=ids.device)
        h = self.tok(ids) + self.pos(t[None] if self.lead else t)
        h = h.cumsum(1) / torch.arange(1, ids.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.head(torch.tanh(self.fc(h)))


def _setup(lead: bool = True) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = SharedPositions(lead)
    ids = torch.randint(0, V, (4, T))
    labels = torch.randint(0, V, (4, T))
    labels[0, -1] = -100  # a dropped position
    return model, ids, labels


def _halves(ids: Tensor, labels: Tensor) -> list[tuple[Tensor, Tensor]]:
    return [(ids[:2], labels[:2]), (ids[2:], labels[2:])]


def _fisher(model: nn.Module, data, structure, **kw) -> fl.FisherOperator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the demotion of 'pos' to torch.func
        return fl.fisher(model, data, structure=structure, **kw)


def _pos_slice(model: nn.Module) -> slice:
    block = next(b for b in ParamLayout.from_model(model).blocks if b.module_name == "pos")
    return slice(block.start, block.stop)


def _no_pos(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith("pos.")]


@pytest.mark.parametrize("lead", [True, False], ids=["positions (1,T)", "positions (T,)"])
@pytest.mark.parametrize("structure", ["kfac", "ekfac", "kron_sum"])
def test_kronecker_structures_give_the_shared_embedding_its_exact_block(lead, structure) -> None:
    model, ids, labels = _setup(lead)
    kw = {"rank": 2} if structure == "kron_sum" else {}
    with pytest.warns(RuntimeWarning, match="'pos'"):
        F = fl.fisher(model, (ids, labels), structure=structure, **kw)
    info = {i.name: i for i in F.layers}
    assert info["pos"].structure == "block_diag"
    if structure == "kfac":  # ekfac, kron_sum never take rows as they come: the first-dim check
        assert "shared by the examples" in info["pos"].reason
    assert {i.name: i.structure for i in F.layers if i.name != "pos"} == {
        "tok": structure, "fc": structure, "head": structure,
    }  # fmt: skip
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    dense, s = F.to_dense(), _pos_slice(model)
    torch.testing.assert_close(dense[s, s], ref[s, s], rtol=1e-10, atol=1e-12)
    # the Kronecker layers: the pure structure on the same layers (positions then fixed)
    pure = fl.fisher(model, (ids, labels), structure=structure, params=_no_pos(model), **kw)
    keep = torch.ones(dense.shape[0], dtype=torch.bool)
    keep[s] = False
    torch.testing.assert_close(dense[keep][:, keep], pure.to_dense(), rtol=1e-10, atol=1e-12)
    assert not dense[s][:, keep].any()


STRUCTURES = [
    "kfac", "ekfac", "kron_sum", "dense", "block_diag", "diag", "quasi_diag",
    {"fc": "kfac", "default": "block_diag"},  # one pass, kfac group
    {"pos": "kfac", "default": "diag"},  # the shared layer itself in the kfac group
    {"head": "ekfac", "tok": "kfac", "default": "diag"},
]  # fmt: skip


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_one_batch_of_four_equals_two_batches_of_two(structure) -> None:
    model, ids, labels = _setup()
    kw = {"rank": 2} if structure == "kron_sum" else {}
    one = _fisher(model, (ids, labels), structure, **kw).to_dense()
    two = _fisher(model, _halves(ids, labels), structure, **kw).to_dense()
    torch.testing.assert_close(two, one, rtol=1e-10, atol=1e-12)
    s = _pos_slice(model)
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    if structure not in ("diag", "quasi_diag") and not (isinstance(structure, dict)):
        torch.testing.assert_close(one[s, s], ref[s, s], rtol=1e-10, atol=1e-12)
    else:  # the diagonal of the shared layer's block at least
        torch.testing.assert_close(one[s, s].diagonal(), ref[s, s].diagonal(), rtol=1e-10, atol=0)


def test_a_first_batch_of_one_example_then_a_shared_call_raises_clearly() -> None:
    model, ids, labels = _setup()
    data = [(ids[:1], labels[:1]), (ids[1:], labels[1:])]
    with pytest.raises(ValueError, match="'pos'.*shared by the examples.*two or more examples"):
        fl.fisher(model, data, structure="kfac")


@pytest.mark.parametrize("sizes", [(2, 2), (1, 3), (3, 1)])
def test_kfac_expand_still_takes_reshaped_rows_over_several_batches(sizes) -> None:
    torch.manual_seed(4)
    model = PairsFlat()
    x, y = torch.randn(4, 2, 3), torch.randint(0, 2, (4,))
    cut = sizes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no demotion: the rows are per-example
        one = fl.fisher(model, (x, y), structure="kfac")
        two = fl.fisher(model, [(x[:cut], y[:cut]), (x[cut:], y[cut:])], structure="kfac")
    assert isinstance(one, fl.operators.KFAC)
    torch.testing.assert_close(two.to_dense(), one.to_dense(), rtol=1e-10, atol=1e-12)


def test_time_major_rows_are_per_example_rows() -> None:
    torch.manual_seed(1)
    lin, head = nn.Linear(3, 4), nn.Linear(4, 2)

    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = lin, head

        def forward(self, x: Tensor) -> Tensor:  # x (N, T, 3) -> (T, N, 3) through lin
            return self.head(torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1))

    class BatchMajor(TimeMajor):
        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.lin(x)))

    x, y = torch.randn(3, 5, 3), torch.randint(0, 2, (3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fl.fisher(TimeMajor(), (x, y), structure="kfac")
    want = fl.fisher(BatchMajor(), (x, y), structure="kfac")
    torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=1e-10, atol=1e-12)


def test_fisher_one_pass_on_the_shared_model_equals_its_groups() -> None:
    model, ids, labels = _setup()
    groups = [(Structure.KFAC, _no_pos(model)), (Structure.KFAC, [model.pos.weight])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ops = fisher_one_pass(model, _halves(ids, labels), groups, BuildOptions.of())
        with pytest.raises(ValueError, match="'pos'.*shared by the examples"):  # strict: an error
            fisher_one_pass(model, _halves(ids, labels), groups, BuildOptions.of(strict=True))
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    s = _pos_slice(model)
    torch.testing.assert_close(ops[1].to_dense(), ref[s, s], rtol=1e-10, atol=1e-12)
    pure = fl.fisher(model, (ids, labels), structure="kfac", params=_no_pos(model))
    torch.testing.assert_close(ops[0].to_dense(), pure.to_dense(), rtol=1e-10, atol=1e-12)


def test_sharded_kfac_names_the_shared_layer_and_why() -> None:
    model, ids, labels = _setup()
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="'pos' .*shared by the"):
        fisher_sharded(model, (ids, labels), structure="kfac")
    S = fisher_sharded(model, (ids, labels), structure="diag")
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    torch.testing.assert_close(S.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)


def test_hugging_face_gpt2_position_embedding_is_exact_and_batching_invariant() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 11, (4, 6))
    lik = fl.Categorical(shift_labels=True)
    batch = {"input_ids": ids, "labels": ids}
    halves = [{"input_ids": ids[s], "labels": ids[s]} for s in (slice(0, 2), slice(2, 4))]
    one = _fisher(model, batch, "kfac", likelihood=lik)
    assert "shared by the examples" in {i.name: i.reason for i in one.layers}["transformer.wpe"]
    two = _fisher(model, halves, "kfac", likelihood=lik)
    torch.testing.assert_close(two.to_dense(), one.to_dense(), rtol=1e-10, atol=1e-12)
    block = next(b for b in ParamLayout.from_model(model).blocks if b.module_name.endswith("wpe"))
    s = slice(block.start, block.stop)
    dense = _fisher(model, batch, "dense", likelihood=lik).to_dense()
    torch.testing.assert_close(one.to_dense()[s, s], dense[s, s], rtol=1e-10, atol=1e-12)


# -- likelihood reprs ------------------------------------------------------------------------------
def test_likelihood_reprs_show_only_meaningful_options() -> None:
    assert repr(fl.Gaussian()) == "Gaussian()"
    assert repr(fl.Gaussian(0.5, positions="mean")) == "Gaussian(sigma=0.5, positions='mean')"
    assert "ignore_index" not in repr(fl.Gaussian(shift_labels=True))
    assert repr(fl.Categorical()) == "Categorical()"
    assert repr(fl.Bernoulli()) == "Bernoulli()"
    assert repr(fl.Categorical(ignore_index=None)) == "Categorical(ignore_index=None)"
    assert repr(fl.Bernoulli(ignore_index=3, positions="mean")) == (
        "Bernoulli(ignore_index=3, positions='mean')"
    )


# -- no operator tracks gradients ------------------------------------------------------------------
MODELS = [
    "linear", "mlp", "cnn", "seq_model", "raw_param_model", "frozen_model", "norm_model",
    "shared_model", "tied_model",
]  # fmt: skip
EVERY = ["dense", "block_diag", "diag", "kfac", "ekfac", "kron_sum", "quasi_diag", "lowrank"]


@pytest.mark.parametrize("name", MODELS)
def test_no_operator_tensor_requires_grad(name: str) -> None:
    model, x, y = getattr(models, name)()
    lik = "gaussian" if y.is_floating_point() else "categorical"
    slow = {"kron_sum"} if name in ("cnn", "norm_model") else set()  # its fit: seconds there
    for structure in (s for s in EVERY if s not in slow):
        kw = {"rank": 2} if structure in ("lowrank", "kron_sum") else {}
        F = _fisher(model, (x, y), structure, likelihood=lik, **kw)
        tracked = [t.shape for t in F.representation() if t.requires_grad]
        assert not tracked, f"{structure}: tensors {tracked} require grad"
        assert not (F @ torch.ones(F.shape[0])).requires_grad, structure
    v = torch.ones(ParamLayout.from_model(model).numel)
    assert not (_fisher(model, (x, y), "implicit", likelihood=lik) @ v).requires_grad
    J = fl.jacobian(model, x)
    assert not (J.T @ torch.ones(J.shape[0])).requires_grad
    scores = fl.influence(model, (x, y), (x[:2], y[:2]), lik, structure="block_diag")
    assert not scores.requires_grad and scores.grad_fn is None
