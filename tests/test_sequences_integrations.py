"""Per-position outputs through fl.compare, fl.laplace.Laplace, FishLeg, fl.jacobian, fl.ntk and
torch.distributed, against float64 references (tests/seq_models.py)."""

from __future__ import annotations

import math

import pytest
import torch
from multiproc import run_in_processes
from seq_models import (
    SeqRegressor,
    TinyGPT,
    gpt_and_batch,
    lm_batch,
    sequence_fisher,
    sequence_jacobian,
)

import fim_linops as fl
from fim_linops.fishleg import fisher_vector_product

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def _nll(model, ids, labels) -> torch.Tensor:
    """Sum over the kept positions of the cross-entropy (the reference fit term)."""
    with torch.no_grad():
        logits = model(ids)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
    )


# -- fl.compare ----------------------------------------------------------------------------------
def test_compare_measures_errors_against_the_masked_per_position_fisher() -> None:
    model, ids, labels = gpt_and_batch()
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    res = fl.compare(model, (ids, labels), ["dense", "diag"], method="dense", top_k=2)
    errs = {r["structure"]: r["rel_error"] for r in res.rows}
    want = torch.linalg.matrix_norm(torch.diag(ref.diagonal()) - ref) / torch.linalg.matrix_norm(
        ref
    )
    assert errs["dense"] < 1e-10
    assert errs["diag"] == pytest.approx(float(want), rel=1e-8)


# -- fl.jacobian and fl.ntk: positions are outputs, row-major (N, T*C) ---------------------------
def test_jacobian_and_ntk_take_positions_as_outputs_in_row_major_order() -> None:
    model, ids, _ = gpt_and_batch()
    _, j = sequence_jacobian(model, ids)  # (N, T, C, P)
    jr = j.reshape(-1, j.shape[-1])  # row (n, t, c) -> n*T*C + t*C + c
    J = fl.jacobian(model, ids)
    torch.testing.assert_close(J.to_dense(), jr, rtol=1e-10, atol=1e-12)
    v = torch.randn(jr.shape[1], 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(J @ v, jr @ v, rtol=1e-10, atol=1e-12)
    for structure in ("implicit", "dense"):
        K = fl.ntk(model, ids, structure=structure)
        torch.testing.assert_close(K.to_dense(), jr @ jr.T, rtol=1e-10, atol=1e-10)
    jn = j.reshape(j.shape[0], -1, j.shape[-1])
    K = fl.ntk(model, ids, outputs="sum").to_dense()
    torch.testing.assert_close(K, torch.einsum("ncp,mcp->nm", jn, jn), rtol=1e-10, atol=1e-10)


# -- fl.laplace.Laplace ------------------------------------------------------------------------------
def _reference_evidence(ggn: torch.Tensor, fit: torch.Tensor, theta: torch.Tensor, delta):
    """log p(D | theta*) - 1/2 (log det (G + delta I) - P log delta + delta |theta*|^2)."""
    p = ggn.shape[0]
    ld = torch.logdet(ggn + delta * torch.eye(p))
    return -fit - 0.5 * (ld - p * torch.log(delta) + delta * (theta**2).sum())


@pytest.mark.parametrize("positions", ["sum", "mean"])
def test_laplace_precision_and_evidence_sum_over_the_kept_positions(positions: str) -> None:
    """The posterior is a sum over the data whatever the normalisation of fl.fisher."""
    model, ids, labels = gpt_and_batch()
    ggn = sequence_fisher(model, ids, "categorical", labels != -100) * ids.shape[0]
    delta = torch.tensor(0.7)
    lik = fl.Categorical(positions=positions)
    la = fl.laplace.Laplace(model, (ids, labels), lik, structure="dense", prior_precision=0.7)
    torch.testing.assert_close(
        la.posterior_precision.to_dense(), ggn + delta * torch.eye(len(ggn)), rtol=1e-10, atol=1e-10
    )
    theta = fl.ParamLayout.from_model(model).vector()
    want = _reference_evidence(ggn, _nll(model, ids, labels), theta, delta)
    torch.testing.assert_close(la.log_marginal_likelihood(), want, rtol=1e-10, atol=1e-10)


def test_laplace_prior_optimisation_finds_the_reference_evidence_maximum() -> None:
    model, ids, labels = gpt_and_batch()
    ggn = sequence_fisher(model, ids, "categorical", labels != -100) * ids.shape[0]
    theta = fl.ParamLayout.from_model(model).vector()
    fit = _nll(model, ids, labels)
    la = fl.laplace.Laplace(model, (ids, labels), structure="dense", prior_precision=1.0)
    la.optimize_prior_precision(n_steps=300, lr=0.1)
    log_delta = la.prior_precision.detach().log().reshape(()).clone().requires_grad_()
    ev = _reference_evidence(ggn, fit, theta, log_delta.exp())
    (grad,) = torch.autograd.grad(ev, log_delta)
    assert abs(float(grad)) < 1e-3 * ggn.shape[0]  # stationary in log delta (P = 720 terms)
    for d in (0.8, 1.25):  # and a maximum: the evidence is lower on both sides
        assert ev > _reference_evidence(ggn, fit, theta, log_delta.exp() * d)


def test_gaussian_laplace_drops_nan_targets_from_the_fit_and_the_constant() -> None:
    torch.manual_seed(0)
    model = SeqRegressor()
    x, y = torch.randn(3, 4, 3), torch.randn(3, 4, 2)
    y[0, 2:] = float("nan")
    kept = ~y.isnan().any(-1)
    sigma = 0.5
    ggn = sequence_fisher(model, x, "gaussian", kept, sigma=sigma) * 3
    la = fl.laplace.Laplace(
        model, (x, y), fl.Gaussian(sigma), structure="dense", prior_precision=2.0
    )
    with torch.no_grad():
        r2 = ((torch.nan_to_num(y) - model(x)) ** 2 * kept[..., None]).sum()
    n_out = int(kept.sum()) * 2
    fit = r2 / (2 * sigma**2) + n_out * math.log(sigma * math.sqrt(2 * math.pi))
    theta = fl.ParamLayout.from_model(model).vector()
    want = _reference_evidence(ggn, fit, theta, torch.tensor(2.0))
    torch.testing.assert_close(la.log_marginal_likelihood(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("structure", ["dense", "diag", "kfac"])
def test_laplace_predictive_treats_positions_as_outputs(structure: str) -> None:
    model, ids, labels = gpt_and_batch()
    n = ids.shape[0]
    la = fl.laplace.Laplace(model, (ids, labels), structure=structure, prior_precision=0.5)
    f_structure = fl.fisher(model, (ids, labels), structure=structure).to_dense()
    sigma = torch.linalg.inv(n * f_structure + 0.5 * torch.eye(len(f_structure)))
    xs = ids[:2].flip(1)
    f, j = sequence_jacobian(model, xs)
    jn = j.reshape(2, -1, j.shape[-1])  # (N, T*C, P)
    mean, cov = la.predictive(xs)
    torch.testing.assert_close(mean, f.reshape(2, -1), rtol=1e-10, atol=1e-12)
    want = torch.einsum("ncp,pq,ndq->ncd", jn, sigma, jn)
    torch.testing.assert_close(cov, want, rtol=1e-8, atol=1e-10)
    probs = la.predictive_probs(xs)  # probit, per position
    var = want.diagonal(dim1=-2, dim2=-1).reshape(f.shape)
    torch.testing.assert_close(
        probs, torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var), -1), rtol=1e-8, atol=1e-10
    )
    assert probs.shape == f.shape


# -- FishLeg ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["sum", "mean"])
def test_fishleg_products_use_the_kept_positions(positions: str) -> None:
    model, ids, labels = gpt_and_batch()
    ref = sequence_fisher(model, ids, "categorical", labels != -100, mean=positions == "mean")
    layout = fl.ParamLayout.from_model(model)
    w = torch.randn(layout.numel, generator=torch.Generator().manual_seed(2))
    lik = fl.Categorical(positions=positions)
    fw = fisher_vector_product(model, lik, ids, layout.unflatten(w), y=labels)
    torch.testing.assert_close(layout.flatten(fw), ref @ w, rtol=1e-10, atol=1e-12)
    # a mapping batch without labels: its attention_mask marks the kept positions
    mask = (labels != -100).long()
    hf_ids = {"ids": ids, "attention_mask": mask}
    fw = fisher_vector_product(model, lik, hf_ids, layout.unflatten(w))
    torch.testing.assert_close(layout.flatten(fw), ref @ w, rtol=1e-10, atol=1e-12)


def test_fishleg_auxiliary_loss_on_a_mapping_batch_matches_the_reference() -> None:
    model, ids, labels = gpt_and_batch()
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    batch = {"ids": ids, "labels": labels}
    opt = fl.FishLeg(model, "categorical", batch, damping=0.3, init_scale=0.5, warmup=1)
    u = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(3))
    q = opt.inverse_fisher.to_dense()
    w = q @ u
    want = 0.5 * w @ (ref + 0.3 * torch.eye(len(ref))) @ w - u @ w
    torch.testing.assert_close(opt.auxiliary_loss(u), want, rtol=1e-10, atol=1e-12)
    loss = torch.nn.functional.cross_entropy(model(ids).reshape(-1, 7), labels.reshape(-1))
    loss.backward()
    opt.step()  # warm-up: an auxiliary update on the mapping batch
    assert torch.isfinite(opt.aux_loss)


# -- torch.distributed: positions="mean" divides by the kept positions of every rank --------------
def _gpt4():
    torch.manual_seed(0)
    model = TinyGPT()
    ids, labels = lm_batch(n=4)
    return model, ids, labels


def _dist_results(model, batches, lik, v):
    out = {}
    # the position embedding's call is shared by the examples of a batch (input arange(T)): KFAC
    # gives it an exact block (its rows would mix the examples), the same on any split of the data
    for s in ("dense", "diag", "kfac", "implicit"):
        F = fl.fisher(model, batches, lik, structure=s)
        w = v[: F.shape[0]]
        out[s] = (F @ w, F.diagonal())
    la = fl.laplace.Laplace(model, batches, lik, structure="diag", prior_precision=0.5)
    out["laplace"] = (la.log_marginal_likelihood().reshape(1), la.posterior_precision @ v)
    return out


def _dist_worker(rank: int, world: int, positions: str) -> dict:
    torch.set_default_dtype(torch.float64)  # a fresh process: as the float64_default fixture
    model, ids, labels = _gpt4()
    # rank 0: sequences 0, 1 (3 + 4 kept positions), rank 1: sequences 2, 3 (5 + 5 kept). Two
    # examples a rank: the position embedding's input (arange(T)) is shared by the examples,
    # which a batch of one example cannot show (the engine's check), so each rank needs two
    part = slice(0, 2) if rank == 0 else slice(2, 4)
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()))
    lik = fl.Categorical(positions=positions)
    return _dist_results(model, [(ids[part], labels[part])], lik, v)


@pytest.mark.parametrize("positions", ["sum", "mean"])
def test_two_processes_with_uneven_kept_positions_equal_one_process(positions: str) -> None:
    got = run_in_processes(_dist_worker, args=(positions,), world_size=2)
    model, ids, labels = _gpt4()
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()))
    lik = fl.Categorical(positions=positions)
    want = _dist_results(model, [(ids, labels)], lik, v)
    ref = sequence_fisher(model, ids, "categorical", labels != -100, mean=positions == "mean")
    torch.testing.assert_close(want["dense"][0], ref @ v, rtol=1e-10, atol=1e-12)
    for rank in range(2):
        for key, pair in want.items():
            for a, b in zip(got[rank][key], pair, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{rank} {key}")
