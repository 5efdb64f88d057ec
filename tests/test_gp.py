"""fl.gp.NTKKernel inside GPyTorch ExactGP models: posterior mean and covariance, marginal
likelihood and its gradient equal the closed form with Theta = J1 J2^T from torch.func.jacrev;
every kernel representation; fast predictive variances; multi-output; diag without the Gram."""

from __future__ import annotations

import gpytorch
import pytest
import torch
from test_ntk import ref_ntk
from torch import nn

from fim_linops.gp import NTKKernel

pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


def net(c: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, c)
    )


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, lik, kernel):
        super().__init__(x, y, lik)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def data(n: int, c: int = 1):
    torch.manual_seed(1)
    x = torch.randn(n, 2)
    y = torch.sin(x.sum(-1, keepdim=True)).expand(n, c) + 0.1 * torch.randn(n, c)
    return x, y


def make_gp(mode: str, scale: float = 0.7, noise: float = 0.05):
    x, y = data(12)
    lik = gpytorch.likelihoods.GaussianLikelihood()
    gp = GP(x, y[:, 0], lik, NTKKernel(net(), mode=mode))
    gp.covar_module.outputscale = scale
    lik.noise = noise
    return gp, lik, x, y[:, 0]


def closed_form(model, x, y, xs, scale, noise):
    kxx = scale * ref_ntk(model, x, None, "full")
    ksx = scale * ref_ntk(model, xs, x, "full")
    kss = scale * ref_ntk(model, xs, None, "full")
    a = kxx + noise * torch.eye(len(x))
    mean = ksx @ torch.linalg.solve(a, y)
    cov = kss - ksx @ torch.linalg.solve(a, ksx.T)
    return mean, cov, a


@pytest.mark.parametrize("mode", ["auto", "dense", "root", "implicit"])
def test_exact_gp_posterior_equals_closed_form(mode):
    gp, lik, x, y = make_gp(mode)
    xs = torch.randn(5, 2)
    gp.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(1000):
        post = gp(xs)
        mean, cov = post.mean, post.covariance_matrix
    ref_mean, ref_cov, _ = closed_form(gp.covar_module.base_kernel.model, x, y, xs, 0.7, 0.05)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-8, atol=1e-10)


def test_marginal_likelihood_and_its_gradients_equal_closed_form():
    gp, lik, x, y = make_gp("auto")
    gp.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)
    with gpytorch.settings.max_cholesky_size(1000):
        value = mll(gp(x), y)
    value.backward()
    raw_scale = gp.covar_module.raw_outputscale
    raw_noise = lik.noise_covar.raw_noise

    theta = ref_ntk(gp.covar_module.base_kernel.model, x, None, "full")
    rs = raw_scale.detach().clone().requires_grad_()
    rn = raw_noise.detach().clone().requires_grad_()
    softplus = torch.nn.functional.softplus
    k = softplus(rs) * theta + (softplus(rn) + 1e-4) * torch.eye(len(x))
    ref = torch.distributions.MultivariateNormal(torch.zeros(len(x)), k).log_prob(y) / len(x)
    ref.backward()
    torch.testing.assert_close(value, ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(raw_scale.grad, rs.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(
        raw_noise.grad, rn.grad.reshape(raw_noise.shape), rtol=1e-7, atol=1e-10
    )


def test_training_the_outputscale_and_noise_raises_the_marginal_likelihood():
    gp, lik, x, y = make_gp("auto", scale=5.0, noise=1.0)
    before = [p.detach().clone() for p in gp.covar_module.base_kernel.model.parameters()]
    gp.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)
    opt = torch.optim.Adam(gp.parameters(), lr=0.1)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = -mll(gp(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    after = list(gp.covar_module.base_kernel.model.parameters())
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))  # network fixed


def test_fast_predictive_variances_match_exact():
    gp, lik, x, y = make_gp("root")
    xs = torch.randn(6, 2)
    gp.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(1000):
        exact = gp(xs).variance
    with torch.no_grad(), gpytorch.settings.fast_pred_var(), gpytorch.settings.max_cholesky_size(0):
        fast = gp(xs).variance
    torch.testing.assert_close(fast, exact, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("output", [None, 1, "sum"])
def test_diag_equals_gram_diagonal_without_the_gram(output):
    model = net(3)
    x = torch.randn(7, 2)
    k = NTKKernel(model, output=output)
    ref = ref_ntk(model, x, None, "full" if output is None else output)
    torch.testing.assert_close(k(x, diag=True), ref.diagonal(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k(x, x, diag=True), ref.diagonal(), rtol=1e-10, atol=1e-12)
    assert k.num_outputs_per_input(x, x) == (3 if output is None else 1)


class MultiGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, lik, kernel):
        super().__init__(x, y, lik)
        self.covar_module = kernel

    def forward(self, x):
        covar = self.covar_module(x)
        mean = torch.zeros(x.shape[0], 3, dtype=x.dtype)
        return gpytorch.distributions.MultitaskMultivariateNormal(mean, covar, interleaved=True)


def test_multi_output_gp_posterior_equals_closed_form():
    x, y = data(8, 3)
    model = net(3)
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=3, has_task_noise=False)
    lik.noise = 0.1
    gp = MultiGP(x, y, lik, NTKKernel(model))
    gp.eval()
    xs = torch.randn(4, 2)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(1000):
        post = gp(xs)
        mean, cov = post.mean, post.covariance_matrix  # (4, 3), interleaved (12, 12)
    kxx = ref_ntk(model, x, None, "full") + 0.1 * torch.eye(24)
    ksx = ref_ntk(model, xs, x, "full")
    ref_mean = ksx @ torch.linalg.solve(kxx, y.reshape(-1))
    ref_cov = ref_ntk(model, xs, None, "full") - ksx @ torch.linalg.solve(kxx, ksx.T)
    torch.testing.assert_close(mean.reshape(-1), ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-8, atol=1e-10)
