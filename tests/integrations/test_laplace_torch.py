"""laplace-torch fits and predicts on the fim_linops backends exactly as on its own backends.

References: laplace-torch's curvlinops backends (``CurvlinopsGGN``, ``CurvlinopsEF``) and its
torch.func Jacobians/gradients, all in float64. Skipped where laplace-torch (which needs
torchvision) cannot be imported; ``.ci/run`` runs them in a venv that has it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import laplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
    from laplace.utils import Kron
except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision built for another torch
    pytest.skip(f"laplace-torch is not importable here: {err}", allow_module_level=True)

from fim_linops.integrations.laplace_torch import (
    FimLinopsEF,
    FimLinopsGGN,
    LowRankLaplace,
    kfac_to_kron,
)

pytestmark = pytest.mark.filterwarnings("ignore")

N_TRAIN = 22  # not a multiple of the batch size: the N scaling of the Kron factors matters
BATCH = 8
TOL = 1e-6


@pytest.fixture(autouse=True)
def _float64_default():
    """laplace-torch's curvlinops backend multiplies by ``torch.eye(P)`` of the default dtype: make
    that float64 so that the reference is float64 throughout."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _problem(likelihood: str, arch: str, seed: int = 0):
    """(model, X, y, loader) in float64: an MLP or a small CNN, C = 3 (classification) or 2."""
    torch.manual_seed(seed)
    c = 3 if likelihood == "classification" else 2
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, c))
        x = torch.randn(N_TRAIN, 5)
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, c)
        )
        x = torch.randn(N_TRAIN, 2, 5, 5)
    model = model.double()
    x = x.double()
    y = (
        torch.randint(0, c, (N_TRAIN,))
        if likelihood == "classification"
        else torch.randn(N_TRAIN, c)
    )
    y = y.double() if y.is_floating_point() else y
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    return model, x, y, loader


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _dense_precision(la) -> torch.Tensor:
    p = la.posterior_precision
    if isinstance(p, torch.Tensor):
        return torch.diag(p) if p.ndim == 1 else p
    return p.to_matrix()  # KronDecomposed


def _fit(model, likelihood, structure, backend, loader, subset="all"):
    la = laplace.Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend,
        prior_precision=0.7,
    )
    la.fit(loader)
    return la


def _glm(la, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GLM predictive mean and covariance of the latent outputs (N, C), (N, C, C)."""
    return la._glm_predictive_distribution(x)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize(
    ("ours", "theirs"), [(FimLinopsGGN, CurvlinopsGGN), (FimLinopsEF, CurvlinopsEF)]
)
def test_laplace_fit_and_predict_equal_laplace_torchs_curvlinops_backend(
    arch, structure, likelihood, ours, theirs
):
    model, x, _, loader = _problem(likelihood, arch)
    la, ref = (_fit(model, likelihood, structure, b, loader) for b in (ours, theirs))
    assert _rel(_dense_precision(la), _dense_precision(ref)) < TOL
    assert float(la.loss) == pytest.approx(float(ref.loss), rel=TOL)
    lml, lml_ref = la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    assert float(lml) == pytest.approx(float(lml_ref), rel=TOL)
    (mu, var), (mu_ref, var_ref) = _glm(la, x[:5]), _glm(ref, x[:5])
    assert _rel(mu, mu_ref) < TOL and _rel(var, var_ref) < TOL
    if likelihood == "classification":
        probs = la(x[:5], pred_type="glm", link_approx="probit")
        assert _rel(probs, ref(x[:5], pred_type="glm", link_approx="probit")) < TOL


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_factors_have_laplaces_layout_and_batch_scaling(arch, likelihood):
    model, x, y, _ = _problem(likelihood, arch)
    xb, yb = x[:BATCH], y[:BATCH]  # one batch of M = 8 out of N = 22
    loss, kron = FimLinopsGGN(model, likelihood).kron(xb, yb, N=N_TRAIN)
    loss_ref, kron_ref = CurvlinopsGGN(model, likelihood).kron(xb, yb, N=N_TRAIN)
    assert float(loss) == pytest.approx(float(loss_ref), rel=TOL)
    init = Kron.init_from_model(model, torch.device("cpu"), torch.float64)
    assert [[f.shape for f in fs] for fs in kron.kfacs] == [
        [f.shape for f in fs] for fs in init.kfacs
    ]
    for fs, fs_ref in zip(kron.kfacs, kron_ref.kfacs, strict=True):
        block = torch.kron(fs[0], fs[1]) if len(fs) == 2 else fs[0]
        block_ref = torch.kron(fs_ref[0], fs_ref[1]) if len(fs_ref) == 2 else fs_ref[0]
        assert _rel(block, block_ref) < TOL


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_jacobians_and_gradients_equal_laplaces_torch_func_ones(arch, likelihood):
    model, x, y, _ = _problem(likelihood, arch)
    js, f = FimLinopsGGN(model, likelihood).jacobians(x)
    js_ref, f_ref = CurvlinopsGGN(model, likelihood).jacobians(x)
    assert (
        js.shape
        == js_ref.shape
        == (N_TRAIN, f_ref.shape[1], sum(p.numel() for p in model.parameters()))
    )
    assert _rel(js, js_ref) < 1e-10 and _rel(f, f_ref) < 1e-12
    gs, loss = FimLinopsEF(model, likelihood).gradients(x, y)
    gs_ref, loss_ref = CurvlinopsEF(model, likelihood).gradients(x, y)
    assert gs.shape == gs_ref.shape
    assert _rel(gs, gs_ref) < 1e-10
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12)


def test_jacobians_with_enable_backprop_are_differentiable_in_x():
    model, x, _, _ = _problem("regression", "mlp")
    x = x[:4].clone().requires_grad_(True)
    js, f = FimLinopsGGN(model, "regression").jacobians(x, enable_backprop=True)
    (js.sum() + f.sum()).backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_eig_lowrank_gives_the_top_eigenpairs_of_the_dense_ggn(likelihood):
    model, _, _, loader = _problem(likelihood, "mlp")
    ggn = _fit(model, likelihood, "full", CurvlinopsGGN, loader).H  # sum over the data
    evals_ref = torch.linalg.eigvalsh(ggn).flip(0)
    k = 6
    u, lam, loss = FimLinopsGGN(model, likelihood, low_rank=k).eig_lowrank(loader)
    assert u.shape == (ggn.shape[0], k) and lam.shape == (k,)
    assert _rel(lam, evals_ref[:k]) < 1e-10
    assert _rel(ggn @ u, u * lam) < 1e-8  # eigenvectors
    assert _rel(u.T @ u, torch.eye(k, dtype=u.dtype)) < 1e-10
    loss_ref = _fit(model, likelihood, "diag", CurvlinopsGGN, loader).loss
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_lowrank_laplace_covering_the_spectrum_equals_the_full_laplace(likelihood):
    model, x, _, loader = _problem(likelihood, "mlp")
    p = sum(q.numel() for q in model.parameters())
    full = _fit(model, likelihood, "full", CurvlinopsGGN, loader)
    low = LowRankLaplace(model, likelihood, prior_precision=0.7, backend_kwargs={"low_rank": p})
    low.fit(loader)
    rank = int((torch.linalg.eigvalsh(full.H) > 1e-10 * full.H.norm()).sum())
    assert low.H[1].shape == (rank,)  # the numerically zero eigenvalues are dropped
    assert float(low.log_marginal_likelihood()) == pytest.approx(
        float(full.log_marginal_likelihood()), rel=1e-8
    )
    (mu, var), (mu_ref, var_ref) = _glm(low, x[:5]), _glm(full, x[:5])
    assert _rel(mu, mu_ref) < 1e-10 and _rel(var, var_ref) < 1e-8


def test_lowrank_laplace_with_few_eigenpairs_is_between_prior_and_full():
    model, x, _, loader = _problem("classification", "mlp")
    full = _fit(model, "classification", "full", CurvlinopsGGN, loader)
    errs = []
    for k in (2, 8, 20):
        low = LowRankLaplace(
            model, "classification", prior_precision=0.7, backend_kwargs={"low_rank": k}
        )
        low.fit(loader)
        errs.append(_rel(_glm(low, x[:5])[1], _glm(full, x[:5])[1]))
    assert errs[0] > errs[1] > errs[2]  # more eigenpairs, closer to the full predictive


def test_laplace_factory_builds_the_lowrank_laplace_on_our_backend(monkeypatch):
    # laplace-torch 0.3 gates LowRankLaplace on the old `asdfghjkl` module, which only its default
    # backend uses; open the gate to show that the factory path runs on our backend.
    import laplace.baselaplace

    monkeypatch.setattr(laplace.baselaplace, "find_spec", lambda name: object())
    model, x, _, loader = _problem("regression", "mlp")
    la = laplace.Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure="lowrank",
        backend=FimLinopsGGN,
        backend_kwargs={"low_rank": 4},
    )
    la.fit(loader)
    ours = LowRankLaplace(model, "regression", backend_kwargs={"low_rank": 4})
    ours.fit(loader)
    assert type(la).__name__ == "LowRankLaplace"
    assert _rel(la.H[1], ours.H[1]) < 1e-12
    mu, var = la(x[:3], pred_type="glm")
    assert mu.shape == (3, 2) and var.shape == (3, 2, 2)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize(
    ("ours", "theirs"), [(FimLinopsGGN, CurvlinopsGGN), (FimLinopsEF, CurvlinopsEF)]
)
def test_last_layer_laplace_equals_laplace_torchs(structure, ours, theirs):
    model, x, _, loader = _problem("classification", "mlp")
    la = _fit(model, "classification", structure, ours, loader, subset="last_layer")
    # laplace-torch's CurvlinopsEF last-layer *diag* goes through its torch.func gradients of the
    # whole model and is wrong; its full EF (curvlinops proper) is the reference for the diagonal.
    ref_structure = "full" if (structure, theirs) == ("diag", CurvlinopsEF) else structure
    ref = _fit(model, "classification", ref_structure, theirs, loader, subset="last_layer")
    if ref_structure != structure:
        assert _rel(la.H, ref.H.diagonal()) < TOL
        return
    assert _rel(_dense_precision(la), _dense_precision(ref)) < TOL
    assert float(la.log_marginal_likelihood()) == pytest.approx(
        float(ref.log_marginal_likelihood()), rel=TOL
    )
    assert _rel(la(x[:4], link_approx="probit"), ref(x[:4], link_approx="probit")) < TOL


def test_stochastic_ggn_is_a_monte_carlo_estimate_of_the_exact_one():
    model, x, y, _ = _problem("classification", "mlp")
    torch.manual_seed(1)
    _, exact = FimLinopsGGN(model, "classification").diag(x, y)
    _, mc = FimLinopsGGN(model, "classification", stochastic=True, num_samples=4000).diag(x, y)
    _, mc1 = FimLinopsGGN(model, "classification", stochastic=True, num_samples=1).diag(x, y)
    assert _rel(mc, exact) < 0.05 < _rel(mc1, exact)


def test_bad_options_raise_errors_that_say_what_to_do():
    model, x, y, _ = _problem("classification", "mlp")
    with pytest.raises(ValueError, match="subnetwork_indices must be non-empty indices"):
        FimLinopsGGN(model, "classification", subnetwork_indices=torch.tensor([0, 10**6])).full(
            x, y
        )
    with pytest.raises(ValueError, match="low_rank"):
        FimLinopsGGN(model, "classification", low_rank=0)
    with pytest.raises(TypeError, match="backend_kwargs"):
        FimLinopsGGN(model, "classification").diag(x, y, bogus=1)
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    with pytest.raises(ValueError, match="grouped"):
        FimLinopsGGN(grouped.double(), "classification").kron(
            torch.randn(5, 2, 5, 5, dtype=torch.float64), y[:5], N=5
        )


def test_kfac_to_kron_keeps_the_model_parameter_order():
    import fim_linops as fl

    model, x, y, _ = _problem("classification", "cnn")
    op = fl.fisher(model, (x, y), structure="kfac")
    kron = kfac_to_kron(op, sum_scale=1.0, mean_scale=1.0)
    shapes = [tuple(p.shape) for p in model.parameters()]
    sizes = [
        tuple(f.shape[0] for f in fs) for fs in kron.kfacs
    ]  # (out, in*kh*kw) for weights, (out,) for biases
    assert sizes == [
        (s[0], int(torch.tensor(s[1:]).prod())) if len(s) > 1 else (s[0],) for s in shapes
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = fl.fisher(model, (x, y), structure="kfac").to_dense()
    # the diagonal blocks of the weights equal those of fim_linops' KFAC (bias cross terms aside)
    start = 0
    for fs, s in zip(kron.kfacs, shapes, strict=True):
        n = int(torch.tensor(s).prod())
        block = torch.kron(fs[0], fs[1]) if len(fs) == 2 else fs[0]
        assert _rel(block, dense[start : start + n, start : start + n]) < 1e-12
        start += n
