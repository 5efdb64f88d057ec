"""``fl.Categorical`` takes soft (probability) targets (N, C): the exact and MC Fishers do not
depend on the targets; the empirical Fisher uses the gradient of the soft cross-entropy,
softmax(f) - q; nll = -sum_c q_c log softmax(f)_c. References: torch's cross-entropy with
probability targets and float64 torch.func gradients (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
from reference import empirical_fisher
from torch import nn

import fim_linops as fl


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    q = torch.softmax(2 * torch.randn(9, 3, dtype=torch.float64), dim=-1)
    return model, x, q


def test_soft_nll_is_torchs_cross_entropy_with_probability_targets():
    _, _, q = _problem()
    f = torch.randn(9, 3, dtype=torch.float64)
    lik = fl.Categorical()
    ref = torch.nn.functional.cross_entropy(f, q, reduction="none")
    torch.testing.assert_close(lik.nll(f, lik.check_target(f, q)), ref, rtol=1e-14, atol=0)


@pytest.mark.parametrize("structure", ["dense", "diag"])
def test_empirical_fisher_of_soft_targets_equals_the_torch_func_reference(structure):
    model, x, q = _problem()
    ref = empirical_fisher(model, x, q, "categorical")  # autograd of the soft nll
    F = fl.fisher(model, (x, q), structure=structure, fisher_type="empirical")
    got = F.to_dense() if structure == "dense" else torch.diag(F.diagonal())
    want = ref if structure == "dense" else torch.diag(ref.diagonal())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_kfac_empirical_fisher_of_soft_targets_is_exact_for_one_example_of_one_linear_layer():
    _, x, q = _problem()
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    ref = empirical_fisher(model, x[:1], q[:1], "categorical")
    F = fl.fisher(model, (x[:1], q[:1]), structure="kfac", fisher_type="empirical")
    torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-13)


def test_one_hot_soft_targets_give_the_hard_label_empirical_fisher():
    model, x, _ = _problem()
    y = torch.randint(0, 3, (9,))
    onehot = torch.nn.functional.one_hot(y, 3).double()
    hard = fl.fisher(model, (x, y), structure="dense", fisher_type="empirical").to_dense()
    soft = fl.fisher(model, (x, onehot), structure="dense", fisher_type="empirical").to_dense()
    torch.testing.assert_close(soft, hard, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fisher_type", ["exact", "mc"])
def test_exact_and_mc_fishers_do_not_depend_on_the_targets(fisher_type):
    model, x, q = _problem()
    y = q.argmax(-1)
    ops = [
        fl.fisher(
            model,
            (x, t),
            structure="dense",
            fisher_type=fisher_type,
            mc_samples=3,
            generator=torch.Generator().manual_seed(0),
        ).to_dense()
        for t in (q, y)
    ]
    assert torch.equal(ops[0], ops[1])


def test_laplace_log_likelihood_of_soft_targets():
    model, x, q = _problem()
    post = fl.laplace.Laplace(model, (x, q), "categorical", structure="diag")
    with torch.no_grad():
        ref = -torch.nn.functional.cross_entropy(model(x), q, reduction="sum")
    torch.testing.assert_close(post.log_likelihood(), ref, rtol=1e-12, atol=0)
