"""What laplace-torch asks of a backend beyond the plain fits: mapping (dict) inputs passed whole,
SubnetLaplace's ``subnetwork_indices``, per-call options (``mc_samples``, ``kfac_approx``,
``asdl_fisher_kwargs``), soft (probability) targets, and half precision refused with an error that
laplace-torch tolerates. References: laplace-torch's curvlinops and torch.func backends, float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import laplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, EFInterface
except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision built for another torch
    pytest.skip(f"laplace-torch is not importable here: {err}", allow_module_level=True)

from fim_linops.integrations.laplace_torch import FimLinopsEF, FimLinopsGGN

pytestmark = pytest.mark.filterwarnings("ignore")

N_TRAIN = 22
BATCH = 8
TOL = 1e-6
BACKENDS = [(FimLinopsGGN, CurvlinopsGGN), (FimLinopsEF, CurvlinopsEF)]


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _mlp(c: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, c)).double()


def _cnn(c: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, c)
    ).double()


def _dense(la) -> torch.Tensor:
    p = la.posterior_precision
    if isinstance(p, torch.Tensor):
        return torch.diag(p) if p.ndim == 1 else p
    return p.to_matrix()


# -- mapping inputs ---------------------------------------------------------------------------------
class DictModel(nn.Module):
    """A model called with a whole mapping, as laplace-torch calls it (``model(x)``), reading
    ``x["input_ids"]``; the mapping carries the labels too (a Hugging Face batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x):
        assert isinstance(x, dict) and "labels" in x  # the whole batch, not model(**x)
        return self.net(x["input_ids"])


class TensorTwin(nn.Module):
    """The same parameters, called with the tensor: the reference for the dict model."""

    def __init__(self, inner: DictModel) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner.net(x)


def _dict_loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    rows = [{"input_ids": xi, "labels": yi} for xi, yi in zip(x, y, strict=True)]
    return DataLoader(rows, batch_size=BATCH)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize(("ours", "theirs"), BACKENDS)
def test_mapping_inputs_are_passed_whole_as_laplace_torch_does(structure, ours, theirs):
    torch.manual_seed(1)
    x, y = torch.randn(N_TRAIN, 5), torch.randint(0, 3, (N_TRAIN,))
    model = DictModel()
    la = laplace.Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=ours,
        prior_precision=0.7,
    )
    la.fit(_dict_loader(x, y))
    ref = laplace.Laplace(
        TensorTwin(model),
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=theirs,
        prior_precision=0.7,
    )
    ref.fit(DataLoader(TensorDataset(x, y), batch_size=BATCH))
    assert _rel(_dense(la), _dense(ref)) < TOL
    assert float(la.log_marginal_likelihood()) == pytest.approx(
        float(ref.log_marginal_likelihood()), rel=TOL
    )
    probe = {"input_ids": x[:5], "labels": y[:5]}
    (mu, var), (mu_ref, var_ref) = (
        la._glm_predictive_distribution(probe),
        ref._glm_predictive_distribution(x[:5]),
    )
    assert _rel(mu, mu_ref) < TOL and _rel(var, var_ref) < TOL


# -- SubnetLaplace ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize(("ours", "theirs"), BACKENDS)
def test_subnet_laplace_equals_laplace_torchs_on_the_same_indices(
    arch, structure, likelihood, ours, theirs
):
    c = 3 if likelihood == "classification" else 2
    model = _mlp(c) if arch == "mlp" else _cnn(c)
    torch.manual_seed(2)
    x = torch.randn(N_TRAIN, 5) if arch == "mlp" else torch.randn(N_TRAIN, 2, 5, 5)
    y = torch.randint(0, c, (N_TRAIN,)) if c == 3 else torch.randn(N_TRAIN, c)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    p = sum(q.numel() for q in model.parameters())
    indices = torch.randperm(p)[:13]  # unsorted, from several parameters
    fits = []
    for backend in (ours, theirs):
        la = laplace.Laplace(
            model,
            likelihood,
            subset_of_weights="subnetwork",
            subnetwork_indices=indices,
            hessian_structure=structure,
            backend=backend,
            prior_precision=0.7,
        )
        la.fit(loader)
        fits.append(la)
    la, ref = fits
    assert la.H.shape == ref.H.shape == ((13, 13) if structure == "full" else (13,))
    assert _rel(la.H, ref.H) < TOL
    assert float(la.log_marginal_likelihood()) == pytest.approx(
        float(ref.log_marginal_likelihood()), rel=TOL
    )
    (mu, var), (mu_ref, var_ref) = (
        la._glm_predictive_distribution(x[:5]),
        ref._glm_predictive_distribution(x[:5]),
    )
    assert _rel(mu, mu_ref) < TOL and _rel(var, var_ref) < TOL


def test_subnet_gradients_and_jacobians_are_the_columns_of_the_full_ones():
    model = _cnn()
    torch.manual_seed(3)
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    idx = torch.tensor([40, 3, 0, 77, 12])
    full = FimLinopsEF(model, "classification")
    sub = FimLinopsEF(model, "classification")
    sub.subnetwork_indices = idx  # as SubnetLaplace sets it, after construction
    assert torch.equal(sub.gradients(x, y)[0], full.gradients(x, y)[0][:, idx])
    assert torch.equal(sub.jacobians(x)[0], full.jacobians(x)[0][..., idx])
    with pytest.raises(ValueError, match="hessian_structure='full' or 'diag'"):
        sub.kron(x, y, N=6)


# -- per-call options -------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_takes_kfac_approx_per_call_as_curvlinops_does(likelihood):
    c = 3 if likelihood == "classification" else 2
    model = _cnn(c)
    torch.manual_seed(4)
    x = torch.randn(BATCH, 2, 5, 5)
    y = torch.randint(0, c, (BATCH,)) if c == 3 else torch.randn(BATCH, c)
    ours, theirs = FimLinopsGGN(model, likelihood), CurvlinopsGGN(model, likelihood)
    krons = {}
    for approx in ("expand", "reduce"):
        loss, kron = ours.kron(x, y, N=N_TRAIN, kfac_approx=approx)
        loss_ref, kron_ref = theirs.kron(x, y, N=N_TRAIN, kfac_approx=approx)
        assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12)
        assert _rel(kron.to_matrix(), kron_ref.to_matrix()) < TOL
        krons[approx] = kron.to_matrix()
    assert _rel(krons["reduce"], krons["expand"]) > 1e-3  # the option reaches the factors
    assert ours.kfac_approx == "expand"  # a per-call option leaves the backend's default alone


@pytest.mark.parametrize("method", ["full", "diag", "kron"])
def test_mc_samples_per_call_estimate_the_exact_ggn(method):
    model = _mlp()
    torch.manual_seed(5)
    x, y = torch.randn(N_TRAIN, 5), torch.randint(0, 3, (N_TRAIN,))
    extra = {"N": N_TRAIN}

    def curvature(backend, **kw):
        out = getattr(backend, method)(x, y, **extra, **kw)[1]
        return out.to_matrix() if method == "kron" else out

    exact = curvature(FimLinopsGGN(model, "classification"))
    mc = FimLinopsGGN(model, "classification", stochastic=True)
    many = curvature(mc, mc_samples=3000, seed=0)
    one = curvature(mc, mc_samples=1, seed=0)
    assert _rel(many, exact) < 0.06 < _rel(one, exact)
    assert torch.equal(curvature(mc, n_mc_samples=3000, seed=0), many)  # ASDL's name, same seed
    # mc_samples does not change the exact GGN (as with laplace-torch's curvlinops backend)
    assert torch.equal(curvature(FimLinopsGGN(model, "classification"), mc_samples=7), exact)


def test_asdl_fisher_kwargs_reach_the_backend_through_laplace():
    model = _mlp()
    torch.manual_seed(6)
    x, y = torch.randn(N_TRAIN, 5), torch.randint(0, 3, (N_TRAIN,))
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    fits = []
    for kwargs in ({"mc_samples": 2000, "seed": 3}, {"n_mc_samples": 2000, "seed": 3}):
        la = laplace.Laplace(
            model,
            "classification",
            subset_of_weights="all",
            hessian_structure="kron",
            backend=FimLinopsGGN,
            backend_kwargs={"stochastic": True},
            asdl_fisher_kwargs=kwargs,
        )
        la.fit(loader)
        fits.append(la.H.to_matrix())
    exact = laplace.Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=FimLinopsGGN,
    )
    exact.fit(loader)
    assert torch.equal(fits[0], fits[1])
    assert _rel(fits[0], exact.H.to_matrix()) < 0.1


def test_unknown_per_call_options_name_the_accepted_ones():
    model = _mlp()
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    backend = FimLinopsGGN(model, "classification")
    with pytest.raises(TypeError, match="mc_samples.*kfac_approx.*seed.*backend_kwargs"):
        backend.diag(x, y, bogus=1)
    with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
        backend.full(x, y, mc_samples=0)
    with pytest.raises(ValueError, match="kfac_approx"):
        backend.kron(x, y, N=4, kfac_approx="sideways")


# -- soft targets -----------------------------------------------------------------------------------
class TorchFuncEF(EFInterface):
    """laplace-torch's own empirical Fisher, from its torch.func per-example gradients
    (laplace-torch's curvlinops EF refuses soft targets in ``full`` and ``kron``)."""


def _soft_problem(model: nn.Module):
    torch.manual_seed(7)
    x = torch.randn(N_TRAIN, 5)
    q = torch.softmax(2 * torch.randn(N_TRAIN, 3), dim=-1)  # probabilities per example
    return x, q, DataLoader(TensorDataset(x, q), batch_size=BATCH)


def _fit_all(model, structure, backend, loader):
    la = laplace.Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=backend,
    )
    la.fit(loader)
    return la


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_soft_targets_ggn_equals_laplace_torchs_and_the_hard_label_one(structure):
    model = _mlp()
    x, q, loader = _soft_problem(model)
    la = _fit_all(model, structure, FimLinopsGGN, loader)
    ref = _fit_all(model, structure, CurvlinopsGGN, loader)
    assert _rel(_dense(la), _dense(ref)) < TOL
    assert float(la.loss) == pytest.approx(float(ref.loss), rel=TOL)
    hard = _fit_all(
        model, structure, FimLinopsGGN, DataLoader(TensorDataset(x, q.argmax(-1)), batch_size=BATCH)
    )
    assert _rel(_dense(la), _dense(hard)) < 1e-12  # the GGN does not depend on the targets


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_soft_targets_ef_equals_laplace_torchs_torch_func_one(structure):
    model = _mlp()
    _, _, loader = _soft_problem(model)
    la = _fit_all(model, structure, FimLinopsEF, loader)
    ref = _fit_all(model, structure, TorchFuncEF, loader)
    assert _rel(_dense(la), _dense(ref)) < TOL
    assert float(la.loss) == pytest.approx(float(ref.loss), rel=TOL)


def test_soft_targets_kron_ef_is_exact_for_one_example_of_one_linear_layer():
    """For one example, each Kronecker block of a linear layer's EF is exact: the weight block
    (g g^T) kron (a a^T) and the bias block g g^T, g = softmax(f) - q."""
    model = nn.Linear(5, 3).double()
    x, q, _ = _soft_problem(model)
    loader = DataLoader(TensorDataset(x[:1], q[:1]), batch_size=1)
    la = _fit_all(model, "kron", FimLinopsEF, loader)
    ref = _fit_all(model, "full", TorchFuncEF, loader)
    h, h_ref = la.H.to_matrix(), ref.H
    w = 15  # weight entries; then 3 bias entries (laplace-torch's Kron has no cross terms)
    assert _rel(h[:w, :w], h_ref[:w, :w]) < TOL and _rel(h[w:, w:], h_ref[w:, w:]) < TOL
    assert float(h[:w, w:].abs().max()) == 0.0


def test_soft_target_gradients_are_those_of_the_soft_cross_entropy():
    model = _cnn()
    torch.manual_seed(8)
    x, q = torch.randn(6, 2, 5, 5), torch.softmax(torch.randn(6, 3), dim=-1)
    gs, loss = FimLinopsEF(model, "classification").gradients(x, q)
    gs_ref, loss_ref = CurvlinopsEF(model, "classification").gradients(x, q)  # torch.func
    assert _rel(gs, gs_ref) < 1e-10
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12)


# -- half precision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["diag", "kron", "full"])
def test_half_precision_raises_an_error_laplace_torch_tolerates_or_works(dtype, method):
    """laplace-torch's own tests accept a ValueError or RuntimeError for half precision; until
    fim_linops computes in half precision, its backends raise a ValueError that says what to do,
    never the TypeError they raised before."""
    model = _mlp().to(dtype)
    x, y = torch.randn(4, 5, dtype=dtype), torch.randint(0, 3, (4,))
    backend = FimLinopsGGN(model, "classification")
    try:
        _, curv = getattr(backend, method)(x, y, N=4)
    except ValueError as err:
        assert "dtype=torch.float32" in str(err)
    else:  # once half precision works: a finite curvature
        dense = curv.to_matrix() if method == "kron" else curv
        assert bool(torch.isfinite(dense.float()).all())
