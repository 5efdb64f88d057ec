"""fl.laplace.Laplace against dense float64 references: the dense Gaussian posterior predictive is
the NTK-GP (Woodbury), structured predictive covariances are J Sigma_structure J^T built densely
from the same structure's Fisher, the evidence and its gradients equal the dense formula, for
scalar, per-layer and diagonal prior precisions."""

from __future__ import annotations

import math

import pytest
import torch
from test_ntk import ref_jacobian, ref_ntk
from torch import nn

import fim_linops as fl
from fim_linops.laplace import Laplace

pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


N, C = 15, 2


def setup(seed: int = 0, device: torch.device | str = "cpu"):
    """Model, data and test inputs, seeded on CPU (the same numbers on every device), on ``device``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, C))
    x, xs = torch.randn(N, 3), torch.randn(4, 3)
    y = torch.randn(N, C)
    return model.to(device), x.to(device), y.to(device), xs.to(device)


def dev(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def n_layers(model: nn.Module) -> int:
    return len(fl.ParamLayout.from_model(model).blocks)


def expand_prior(model: nn.Module, prior: torch.Tensor) -> torch.Tensor:
    layout = fl.ParamLayout.from_model(model)
    if prior.numel() == 1:
        return prior.reshape(()).expand(layout.numel)
    if prior.numel() == len(layout.blocks):
        return torch.repeat_interleave(prior, torch.tensor(layout.block_sizes, device=prior.device))
    return prior


@pytest.mark.parametrize("sigma", [1.0, 0.3])
def test_dense_gaussian_laplace_is_the_ntk_gp(sigma, device):
    model, x, y, xs = setup(device=device)
    delta = 0.7
    la = Laplace(model, (x, y), fl.Gaussian(sigma), structure="dense", prior_precision=delta)
    kxx, ksx = ref_ntk(model, x, None, "full"), ref_ntk(model, xs, x, "full")
    kss = ref_ntk(model, xs, None, "full")
    ref = (
        kss
        - ksx @ torch.linalg.solve(kxx + delta * sigma**2 * torch.eye(N * C, device=device), ksx.T)
    ) / delta
    mean, cov = la.predictive(xs, joint=True)
    torch.testing.assert_close(cov, ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(mean, model(xs).detach(), rtol=1e-12, atol=1e-12)
    _, blocks = la.predictive(xs)
    per_example = torch.stack([ref[n * C : (n + 1) * C, n * C : (n + 1) * C] for n in range(4)])
    torch.testing.assert_close(blocks, per_example, rtol=1e-8, atol=1e-10)


def dense_sigma(model, x, y, structure, prior, sigma=1.0, rank=None):
    f = fl.fisher(model, (x, y), fl.Gaussian(sigma), structure=structure, rank=rank).to_dense()
    return torch.linalg.inv(N * f + torch.diag(expand_prior(model, prior)))


PRIORS = {
    "scalar": lambda m: torch.tensor(0.8).to(dev(m)),
    "layer": lambda m: torch.linspace(0.5, 2.0, n_layers(m)).to(dev(m)),
    "diag": lambda m: (torch.rand(fl.ParamLayout.from_model(m).numel) + 0.5).to(dev(m)),
}
CASES = [
    (s, k)
    for s in ["dense", "block_diag", "diag", "kfac", "ekfac", "lowrank"]
    for k in PRIORS
    if not (k == "diag" and s in ("kfac", "ekfac", "lowrank"))
    and not (k == "layer" and s == "lowrank")
]


@pytest.mark.parametrize(("structure", "kind"), CASES)
def test_structured_predictive_equals_j_sigma_jt(structure, kind, device):
    model, x, y, xs = setup(device=device)
    prior = PRIORS[kind](model)
    rank = 12 if structure == "lowrank" else None
    la = Laplace(model, (x, y), "gaussian", structure=structure, prior_precision=prior, rank=rank)
    sigma = dense_sigma(model, x, y, structure, prior, rank=rank)
    j = ref_jacobian(model, xs)
    ref = j @ sigma @ j.T
    _, joint = la.predictive(xs, joint=True)
    torch.testing.assert_close(joint, ref, rtol=1e-7, atol=1e-10)
    _, cov = la.predictive(xs)
    per_example = torch.stack([ref[n * C : (n + 1) * C, n * C : (n + 1) * C] for n in range(4)])
    torch.testing.assert_close(cov, per_example, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(
        la.posterior_precision.to_dense(), torch.linalg.inv(sigma), rtol=1e-7, atol=1e-8
    )


@pytest.mark.parametrize(("structure", "kind"), CASES)
def test_log_marginal_likelihood_and_gradients_equal_dense_formula(structure, kind, device):
    model, x, y, _ = setup(device=device)
    prior0 = PRIORS[kind](model)
    rank = 12 if structure == "lowrank" else None
    la = Laplace(
        model, (x, y), fl.Gaussian(1.0), structure=structure, prior_precision=prior0, rank=rank
    )
    g = N * fl.fisher(model, (x, y), "gaussian", structure=structure, rank=rank).to_dense()
    theta = fl.ParamLayout.from_model(model).vector()
    ssr = ((model(x) - y) ** 2).sum().detach()

    def dense_lml(prior, sigma):
        vec = expand_prior(model, prior)
        ll = -ssr / (2 * sigma**2) - N * C * torch.log(sigma * math.sqrt(2 * math.pi))
        post = g / sigma**2 + torch.diag(vec)
        return ll - 0.5 * (torch.logdet(post) - vec.log().sum() + (vec * theta**2).sum())

    p1, s1 = prior0.clone().requires_grad_(), torch.tensor(0.8, device=device, requires_grad=True)
    p2, s2 = prior0.clone().requires_grad_(), torch.tensor(0.8, device=device, requires_grad=True)
    value = la.log_marginal_likelihood(p1, s1)
    ref = dense_lml(p2, s2)
    torch.testing.assert_close(value, ref, rtol=1e-9, atol=1e-9)
    value.backward()
    ref.backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-7, atol=1e-9)


def test_optimize_prior_precision_raises_the_evidence():
    model, x, y, _ = setup()
    la = Laplace(model, (x, y), fl.Gaussian(1.0), structure="kfac", prior_precision=50.0)
    before = la.log_marginal_likelihood().detach()
    la.optimize_prior_precision(n_steps=50, sigma=True)
    assert la.log_marginal_likelihood() > before
    assert la.prior_precision.ndim == 0 and la.sigma > 0


def test_samples_have_the_posterior_covariance():
    model, x, y, _ = setup()
    la = Laplace(model, (x, y), "gaussian", structure="kfac", prior_precision=2.0)
    gen = torch.Generator().manual_seed(0)
    s = la.sample(40000, generator=gen)
    ref = torch.linalg.inv(la.posterior_precision.to_dense())
    emp = torch.cov((s - la.mean).T, correction=0)
    assert (emp - ref).norm() / ref.norm() < 0.05
    assert (s.mean(0) - la.mean).abs().max() < 0.05


def test_probit_and_mc_class_probabilities():
    model, x, _, xs = setup()
    yc = torch.randint(0, C, (N,))
    la = Laplace(model, (x, yc), "categorical", structure="kfac", prior_precision=1.0)
    mean, cov = la.predictive(xs)
    probit = la.predictive_probs(xs)
    ref = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * cov.diagonal(dim1=-2, dim2=-1)), -1)
    torch.testing.assert_close(probit, ref)
    mc = la(xs, link_approx="mc", n_samples=20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc.sum(-1), torch.ones(4))
    assert (mc - probit).abs().max() < 0.05


def test_bernoulli_probit_returns_one_probability_per_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,)).double()
    la = Laplace(model, (x, y), "bernoulli", structure="diag")
    p = la.predictive_probs(torch.randn(5, 3))
    assert p.shape == (5,) and bool(((p > 0) & (p < 1)).all())


def test_unsupported_prior_kinds_raise():
    model, x, y, _ = setup()
    vec = torch.ones(fl.ParamLayout.from_model(model).numel)
    with pytest.raises(ValueError, match="per layer"):
        Laplace(model, (x, y), "gaussian", structure="kfac", prior_precision=vec)
    with pytest.raises(ValueError, match="scalar"):
        Laplace(
            model, (x, y), "gaussian", structure="lowrank", rank=4, prior_precision=torch.ones(3)
        )
    with pytest.raises(ValueError, match="positive"):
        Laplace(model, (x, y), "gaussian", structure="diag", prior_precision=-1.0)


def test_model_is_left_as_found():
    model, x, y, xs = setup()
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    la = Laplace(model, (x, y), "gaussian", structure="kfac")
    la.predictive(xs)
    la.sample(2)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
