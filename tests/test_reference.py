"""The brute-force references themselves, checked against closed forms and plain autograd."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from models import ALL_MODELS, linear, mlp
from reference import (
    block_diag_of,
    block_slices,
    diag_of,
    empirical_fisher,
    exact_fisher,
    kfac_reference,
    mc_fisher,
    output_hessians,
    per_example_jacobians,
)
from torch import Tensor, nn

import fim_linops as fl

LIKELIHOODS = ["categorical", "gaussian", "bernoulli"]


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters in named_parameters order (shared ones once)."""
    return [p for p in model.parameters() if p.requires_grad]


def autograd_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """(N, C, P) by one plain backward per output entry of the float64 batched forward."""
    model = copy.deepcopy(model).double()
    x = x.double() if x.is_floating_point() else x
    params = trainable(model)
    f = model(x)
    f = f.reshape(f.shape[0], -1)
    rows = []
    for n in range(f.shape[0]):
        for c in range(f.shape[1]):
            gs = torch.autograd.grad(f[n, c], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for g, p in zip(gs, params, strict=True)
                    ]
                )
            )
    return torch.stack(rows).reshape(f.shape[0], f.shape[1], -1)


# -- Jacobians and output Hessians --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_per_example_jacobians_match_plain_autograd_on_the_batch(name):
    model, x, _ = ALL_MODELS[name]()
    jac = per_example_jacobians(model, x)
    assert jac.dtype == torch.float64
    assert jac.shape[-1] == fl.ParamLayout.from_model(model).numel
    torch.testing.assert_close(jac, autograd_jacobian(model, x), rtol=1e-10, atol=1e-12)


def test_per_example_jacobians_accept_tuple_and_dict_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, u: Tensor, v: Tensor) -> Tensor:
            return torch.tanh(self.a(u) * self.b(v))

    torch.manual_seed(0)
    model, u, v = TwoInputs(), torch.randn(5, 3), torch.randn(5, 2)
    as_tuple = per_example_jacobians(model, (u, v))
    as_dict = per_example_jacobians(model, {"u": u, "v": v})
    torch.testing.assert_close(as_tuple, as_dict, rtol=0, atol=0)
    # column of a.weight[o, i] for output o: b(v)_o u_i (1 - f_o^2)
    m64 = copy.deepcopy(model).double()
    u64, v64 = u.double(), v.double()
    f = m64(u64, v64)
    expected = (m64.b(v64) * (1 - f**2))[:, :, None] * u64[:, None, :]  # (n, o, i)
    jw = as_tuple[:, :, :12].reshape(5, 4, 4, 3)  # (n, c, o, i)
    got = torch.diagonal(jw, dim1=1, dim2=2).permute(0, 2, 1)  # c == o: (n, o, i)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert float(jw.abs().sum() - got.abs().sum()) < 1e-12  # c != o: zero


def test_per_example_jacobians_with_params_are_the_matching_columns():
    model, x, _ = mlp("categorical")
    full = per_example_jacobians(model, x)
    sub = per_example_jacobians(model, x, params=[model[2], model[4].bias])
    torch.testing.assert_close(sub, torch.cat([full[..., 42:90], full[..., 114:118]], -1))


def test_output_hessians_are_the_closed_forms():
    torch.manual_seed(0)
    f = torch.randn(5, 4, dtype=torch.float64)
    p = torch.softmax(f, -1)
    torch.testing.assert_close(
        output_hessians("categorical", f), torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    )
    eye = torch.eye(4, dtype=torch.float64).expand(5, 4, 4)
    torch.testing.assert_close(output_hessians(fl.Gaussian(sigma=0.5), f), eye / 0.25)
    q = torch.sigmoid(f[:, :1])
    torch.testing.assert_close(output_hessians("bernoulli", f[:, :1]), (q * (1 - q))[:, :, None])
    y = torch.randint(0, 4, (5,))
    torch.testing.assert_close(
        output_hessians("categorical", f, y), output_hessians("categorical", f)
    )


# -- exact, empirical and Monte-Carlo Fishers ---------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_exact_fisher_of_a_linear_gaussian_model_is_the_input_second_moment(bias, sigma):
    model, x, _ = linear(n=6, d_in=4, d_out=3, bias=bias)
    x64 = x.double()
    n, c = x.shape[0], 3
    eye = torch.eye(c, dtype=torch.float64)
    # public order: W row-major (o, i), then b (o); J_n = [I kron x_n^T | I]
    xx = x64.T @ x64 / n  # (i, i)
    expected = torch.kron(eye, xx)
    if bias:
        xm = x64.mean(0)[:, None]  # (i, 1)
        expected = torch.cat(
            [
                torch.cat([expected, torch.kron(eye, xm)], 1),
                torch.cat([torch.kron(eye, xm.T), eye], 1),
            ]
        )
    got = exact_fisher(model, x, fl.Gaussian(sigma=sigma))
    torch.testing.assert_close(got, expected / sigma**2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("n_samples", [100, 1_000, 10_000])
def test_mc_fisher_converges_to_the_exact_fisher(likelihood, n_samples):
    model, x, _ = mlp(likelihood)
    exact = exact_fisher(model, x, likelihood)
    mc = mc_fisher(model, x, likelihood, n_samples, torch.Generator().manual_seed(1))
    assert rel_err(mc, exact) < 3 / math.sqrt(n_samples)


def test_mc_fisher_is_reproducible_with_a_generator():
    model, x, _ = mlp("categorical")
    a = mc_fisher(model, x, "categorical", 5, torch.Generator().manual_seed(3))
    b = mc_fisher(model, x, "categorical", 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _nll_grad(model: nn.Module, x: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """g = grad of nll(model(x), y) summed over the batch, by plain autograd in float64."""
    lik = fl.likelihoods.get_likelihood(likelihood)
    model = copy.deepcopy(model).double()
    params = trainable(model)
    f = lik.check_output(model(x.double() if x.is_floating_point() else x))
    loss = lik.nll(f, lik.check_target(f, y)).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_empirical_fisher_of_one_example_is_g_g_transposed(likelihood):
    model, x, y = mlp(likelihood)
    g = _nll_grad(model, x[:1], y[:1], likelihood)
    torch.testing.assert_close(
        empirical_fisher(model, x[:1], y[:1], likelihood), torch.outer(g, g), rtol=1e-10, atol=1e-14
    )


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_empirical_fisher_is_the_mean_of_per_example_outer_products(name):
    model, x, y = ALL_MODELS[name]()
    gs = torch.stack(
        [_nll_grad(model, x[i : i + 1], y[i : i + 1], "categorical") for i in range(len(y))]
    )
    torch.testing.assert_close(
        empirical_fisher(model, x, y, "categorical"), gs.T @ gs / len(y), rtol=1e-10, atol=1e-14
    )


def test_exact_fisher_with_params_is_the_sub_block():
    model, x, _ = mlp("gaussian")
    full = exact_fisher(model, x, "gaussian")
    sub = exact_fisher(model, x, "gaussian", params=[model[0]])
    torch.testing.assert_close(sub, full[:42, :42])


# -- structures and KFAC ------------------------------------------------------------------------
def test_block_slices_and_structure_helpers():
    model, _, _ = mlp("categorical")
    slices = block_slices(model)
    assert slices == [(0, 42), (42, 90), (90, 118)]
    F = torch.arange(118.0**2, dtype=torch.float64).reshape(118, 118)
    bd = block_diag_of(F, slices)
    assert bd[0, 41] == F[0, 41] and bd[0, 42] == 0 and bd[100, 100] == F[100, 100]
    torch.testing.assert_close(diag_of(F).diagonal(), F.diagonal())
    assert diag_of(F).count_nonzero() == 117  # F[0, 0] is zero
    frozen = ALL_MODELS["frozen"]()[0]
    assert block_slices(frozen) == [(0, 7), (7, 49), (49, 77)]


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("bias", [True, False])
def test_kfac_reference_is_exact_for_one_example_through_one_linear_layer(likelihood, bias):
    model, x, _ = linear(n=1, d_in=4, d_out=3, bias=bias)
    torch.testing.assert_close(
        kfac_reference(model, x, likelihood),
        exact_fisher(model, x, likelihood),
        rtol=1e-10,
        atol=1e-13,
    )


def test_kfac_reduce_reference_is_exact_for_one_example_with_a_constant_sequence_input():
    # one example, T positions summed: reduce-KFAC is exact when a is constant over t
    # (then the per-example gradient sum_t g_t a^T = (sum_t g_t) a^T)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(1, 1, 4).expand(1, 5, 4)

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, h: Tensor) -> Tensor:
            return self.lin(h).sum(1)

    pooled = Pool()
    torch.testing.assert_close(
        kfac_reference(pooled, x, "gaussian", approx="reduce"),
        exact_fisher(pooled, x, "gaussian"),
        rtol=1e-10,
        atol=1e-12,
    )


def test_kfac_reference_refuses_non_linear_layers_and_reused_layers():
    with pytest.raises(ValueError, match="nn.Linear only"):
        kfac_reference(*ALL_MODELS["cnn"]()[:2], "categorical")
    with pytest.raises(ValueError, match="called 2 times"):
        kfac_reference(*ALL_MODELS["shared"]()[:2], "categorical")


# -- properties of every reference ---------------------------------------------------------------
def _assert_symmetric_psd(F: Tensor) -> None:
    assert F.dtype == torch.float64
    torch.testing.assert_close(F, F.T, rtol=0, atol=1e-13 * float(F.abs().max()))
    evals = torch.linalg.eigvalsh((F + F.T) / 2)
    assert float(evals.min()) >= -1e-10 * float(evals.max())


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_references_are_symmetric_psd(name):
    model, x, y = ALL_MODELS[name]()
    _assert_symmetric_psd(exact_fisher(model, x, "categorical"))
    _assert_symmetric_psd(empirical_fisher(model, x, y, "categorical"))
    _assert_symmetric_psd(mc_fisher(model, x, "categorical", 3, torch.Generator().manual_seed(0)))
    if name in ("mlp", "frozen"):
        _assert_symmetric_psd(kfac_reference(model, x, "categorical"))


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {
            k: (v.detach().clone(), v.dtype, v.requires_grad, v.grad)
            for k, v in model.named_parameters()
        },
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


@pytest.mark.parametrize("name", ["mlp", "frozen", "norm", "tied"])
def test_references_leave_the_callers_model_unchanged(name):
    model, x, y = ALL_MODELS[name]()
    before = _snapshot(model)
    per_example_jacobians(model, x)
    exact_fisher(model, x, "categorical")
    empirical_fisher(model, x, y, "categorical")
    mc_fisher(model, x, "categorical", 2, torch.Generator().manual_seed(0))
    if name in ("mlp", "frozen"):
        kfac_reference(model, x, "categorical")
    after = _snapshot(model)
    assert after["training"] == before["training"]
    assert before["buffers"].keys() == after["buffers"].keys()
    for k, v in before["buffers"].items():
        assert torch.equal(v, after["buffers"][k])
    for k, (value, dtype, requires_grad, g) in before["params"].items():
        value2, dtype2, requires_grad2, g2 = after["params"][k]
        assert dtype2 == dtype == torch.float32
        assert requires_grad2 == requires_grad
        assert g is None and g2 is None
        assert torch.equal(value, value2)
    if name == "tied":
        assert model.out.weight is model.embed.weight
