"""fl.influence on a per-token transformer (sequence outputs, -100 labels) against float64
references; the low-rank query compression (query_rank=) and its error bound; the "influence"
progress bar; scores free of autograd graphs; torch.distributed (each rank scores its shard)."""

from __future__ import annotations

import models
import pytest
import torch
from multiproc import run_in_processes
from seq_models import TinyGPT, lm_batch, sequence_fisher
from test_influence import DAMPING, ref_grads, ref_scores, split
from torch.func import functional_call, grad, vmap

import fim_linops as fl

pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references

LIK = fl.Categorical(ignore_index=-100)


def token_grads(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, P) gradients of each sequence's summed cross-entropy over its kept (label != -100)
    positions, by torch.func.grad, in parameters_to_vector order (the tied weight once)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x, y):
        logits = functional_call(model, p, (x[None],))[0]  # (T, V)
        return torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum")

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, ids, labels)
    return torch.cat([g[n].reshape(ids.shape[0], -1) for n in params], dim=1)


@pytest.mark.filterwarnings("ignore:the layer rules would be wrong:RuntimeWarning")
@pytest.mark.parametrize("structure", ["dense", "ekfac"])
def test_per_token_transformer_matches_float64_reference(structure):
    """TinyGPT (embeddings, causal attention, LayerNorms, tied head), (N, T, V) logits, labels with
    -100 (padding, a prompt position): scores = Gq (F + d I)^-1 Gt^T with g summed over the kept
    positions; F the dense per-position Fisher (dense) or the ekfac operator densified."""
    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    ids, labels = lm_batch(n=5, t=5, seed=1)
    train = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
    q_labels = labels[:3].roll(1, dims=1)  # other targets, -100 moved along
    if structure == "dense":
        F = sequence_fisher(model, ids, "categorical", labels != -100)
    else:
        F = fl.fisher(model, train, likelihood=LIK, structure=structure).to_dense()
    want = ref_scores(F, token_grads(model, ids[:3], q_labels), token_grads(model, ids, labels))
    got = fl.influence(
        model, train, (ids[:3], q_labels), likelihood=LIK, structure=structure, damping=DAMPING
    )
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    selfi = fl.self_influence(model, train, likelihood=LIK, structure=structure, damping=DAMPING)
    ref_self = ref_scores(F, token_grads(model, ids, labels), token_grads(model, ids, labels))
    torch.testing.assert_close(selfi, ref_self.diagonal(), rtol=1e-8, atol=1e-10)


def test_scores_carry_no_autograd_graph():
    model, x, y = models.raw_param_model()  # a torch.func layer
    train, query, _ = split(x, y)
    got = fl.influence(model, train, query, structure="dense", damping=DAMPING)
    assert not got.requires_grad and got.grad_fn is None


@pytest.mark.parametrize("rank", [1, 2])
def test_query_rank_is_the_truncated_svd_within_its_bound(rank):
    """query_rank=r: scores = G Q_r with Q_r the best rank-r approximation of the preconditioned
    queries Q = (F + d I)^-1 Gq^T, hence |scores[:, j] - exact[:, j]| <= s_{r+1}(Q) |g_j|."""
    model, x, y = models.mlp()
    train = [(x[:5], y[:5]), (x[5:], y[5:])]
    query = (x[:4], (y[:4] + 1) % 3)
    F = fl.fisher(model, train, structure="kfac").to_dense()
    gq, gt = ref_grads(model, *query), ref_grads(model, x, y)
    q = torch.linalg.solve(F + DAMPING * torch.eye(F.shape[0]), gq.T)  # (P, n_query)
    u, s, vh = torch.linalg.svd(q, full_matrices=False)
    q_r = u[:, :rank] * s[:rank] @ vh[:rank]
    exact = fl.influence(model, train, query, structure="kfac", damping=DAMPING)
    got = fl.influence(model, train, query, structure="kfac", damping=DAMPING, query_rank=rank)
    torch.testing.assert_close(got, (gt @ q_r).T, rtol=1e-8, atol=1e-10)
    err = (got - exact).norm(dim=0)  # per training example
    assert bool((err <= s[rank] * gt.norm(dim=1) * (1 + 1e-10)).all())
    assert float(err.max()) > 0  # the compression did change something
    # top_influences follows the compressed scores
    vals, idx = fl.top_influences(
        model, train, query, k=3, structure="kfac", damping=DAMPING, query_rank=rank
    )
    torch.testing.assert_close(vals, got.gather(1, idx))


def test_query_rank_at_least_n_query_is_exact_and_bad_ranks_raise():
    model, x, y = models.mlp()
    train, query, _ = split(x, y)
    exact = fl.influence(model, train, query, structure="ekfac", damping=DAMPING)
    got = fl.influence(model, train, query, structure="ekfac", damping=DAMPING, query_rank=3)
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="query_rank"):
            fl.influence(model, train, query, structure="diag", query_rank=bad)


def test_progress_bar_is_labelled_influence(capsys):
    model, x, y = models.mlp()
    train, query, _ = split(x, y)
    fl.influence(model, train, query, structure="diag", damping=DAMPING, progress=True)
    err = capsys.readouterr().err
    assert "influence" in err and "2/2" in err


# -- torch.distributed: each rank scores its shard -------------------------------------------------
def _shard_scores(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    torch.set_default_dtype(torch.float64)
    model, x, y = models.mlp()
    shard = slice(0, 5) if rank == 0 else slice(5, None)
    train = [(x[shard][:3], y[shard][:3]), (x[shard][3:], y[shard][3:])]
    query = (x[:3], (y[:3] + 1) % 3)
    out = {}
    for structure in ("ekfac", "dense"):
        out[structure] = fl.influence(model, train, query, structure=structure, damping=DAMPING)
        out[structure + "_self"] = fl.self_influence(
            model, train, structure=structure, damping=DAMPING
        )
    return out


def test_distributed_ranks_score_their_shards():
    """Two gloo ranks, each with half the training data: F is all-reduced (the Fisher of all the
    data), each rank returns its shard's columns; concatenated they equal the one-process scores."""
    got = run_in_processes(_shard_scores, world_size=2, timeout=300)
    model, x, y = models.mlp()
    train = [(x[:5], y[:5]), (x[5:], y[5:])]
    query = (x[:3], (y[:3] + 1) % 3)
    for structure in ("ekfac", "dense"):
        whole = fl.influence(model, train, query, structure=structure, damping=DAMPING)
        assert got[0][structure].shape == (3, 5)
        torch.testing.assert_close(
            torch.cat([got[0][structure], got[1][structure]], dim=1), whole, rtol=1e-8, atol=1e-10
        )
        selfi = fl.self_influence(model, train, structure=structure, damping=DAMPING)
        torch.testing.assert_close(
            torch.cat([got[0][structure + "_self"], got[1][structure + "_self"]]),
            selfi,
            rtol=1e-8,
            atol=1e-10,
        )
