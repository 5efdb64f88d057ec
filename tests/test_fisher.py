"""fl.fisher against brute force: dense float64 references built by torch.func (per-example
Jacobians by jacrev, output Hessians by torch.func.hessian of the nll), on an MLP, CNNs with
stride/padding/dilation/groups, an Embedding + LayerNorm sequence model, modules holding raw
parameters, shared and tied weights, frozen parameters, and each likelihood and Fisher type."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

import fim_linops as fl

pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


N = 7


# -- models ---------------------------------------------------------------------------------------
class Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class RawParam(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.l1, self.sc, self.l2 = nn.Linear(4, 6), Scale(6), nn.Linear(6, c)
        self.offset = nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.sc(self.l1(x)))) + self.offset


class Shared(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.l, self.o = nn.Linear(4, 4), nn.Linear(4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.l(torch.tanh(self.l(x)))))


class Seq(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(6, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(self.norm(self.emb(x)))).mean(1))


class Tied(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(c, 4)
        self.out = nn.Linear(4, c, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x).mean(1)))


def mlp(c: int) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, c))


def cnn(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, dilation=2, groups=2, padding=2, padding_mode="reflect"),
        nn.Tanh(),
        nn.GroupNorm(2, 4),
        nn.Conv2d(4, 4, 3, padding="same", groups=4, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, c),
    )


def cnn1d(c: int) -> nn.Module:
    m = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2),
        nn.Tanh(),
        nn.BatchNorm1d(4),
        nn.Flatten(),
        nn.Linear(4 * 5, c),
    ).eval()
    with torch.no_grad():
        m[2].running_mean.normal_()
        m[2].running_var.uniform_(0.5, 2.0)
    return m


def frozen(c: int) -> nn.Module:
    m = mlp(c)
    m[0].weight.requires_grad_(False)
    m[2].bias.requires_grad_(False)
    return m


MODELS = {
    "mlp": (mlp, lambda: torch.randn(N, 4)),
    "cnn": (cnn, lambda: torch.randn(N, 2, 9, 9)),
    "cnn1d": (cnn1d, lambda: torch.randn(N, 2, 10)),
    "seq": (Seq, lambda: torch.randint(0, 11, (N, 5))),
    "raw_param": (RawParam, lambda: torch.randn(N, 4)),
    "shared": (Shared, lambda: torch.randn(N, 4)),
    "tied": (Tied, lambda: torch.randint(0, 3, (N, 3))),
    "frozen": (frozen, lambda: torch.randn(N, 4)),
}

LIKELIHOODS = {"categorical": 3, "gaussian": 3, "bernoulli": 1}


def make(name: str, likelihood: str, seed: int = 0, device: torch.device | str = "cpu"):
    """Model, inputs and labels, seeded on CPU (the same numbers on every device), then moved to
    ``device``."""
    torch.manual_seed(seed)
    factory, inputs = MODELS[name]
    c = LIKELIHOODS[likelihood]
    model = factory(c).double()
    x = inputs()
    y = {
        "categorical": torch.randint(0, c, (N,)),
        "gaussian": torch.randn(N, c),
        "bernoulli": torch.randint(0, 2, (N,)).double(),
    }[likelihood]
    return model.to(device), x.to(device), y.to(device)


# -- brute-force references ------------------------------------------------------------------------
def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-example Jacobians (N, C, P) by jacrev, in parameters_to_vector order."""
    params = trainable(model)

    def f(p, xn):
        out = functional_call(model, p, (xn[None],))
        return out.reshape(1, -1)[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    return torch.cat([jac[n].reshape(x.shape[0], -1, params[n].numel()) for n in params], -1)


def nll(likelihood: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example negative log-likelihood written independently of fim_linops."""
    if likelihood == "categorical":
        return -(torch.log_softmax(f, -1) * (torch.arange(f.shape[-1], device=f.device) == y)).sum()
    if likelihood == "gaussian":
        return 0.5 * ((f - y) ** 2).sum()
    return nn.functional.softplus(f[0]) - y * f[0]


def exact_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str
) -> torch.Tensor:
    """1/N sum_n J_n^T H_n J_n with H_n = d^2 nll / d f^2 by torch.func.hessian."""
    j = jacobians(model, x)
    with torch.no_grad():
        f = model(x).reshape(x.shape[0], -1)
    h = vmap(hessian(lambda fn, yn: nll(likelihood, fn, yn)))(f, y)
    return torch.einsum("ncp,ncd,ndq->pq", j, h, j) / x.shape[0]


def empirical_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str
) -> torch.Tensor:
    """1/N sum_n g_n g_n^T with g_n the gradient of the nll at the data's label."""
    params = trainable(model)

    def loss(p, xn, yn):
        return nll(likelihood, functional_call(model, p, (xn[None],)).reshape(1, -1)[0], yn)

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([g[n].reshape(x.shape[0], -1) for n in params], -1)
    return g.T @ g / x.shape[0]


def block_mask(model: nn.Module, size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    for b in fl.ParamLayout.from_model(model).blocks:
        mask[b.start : b.stop, b.start : b.stop] = True
    return mask


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    scale = b.abs().max().clamp_min(1e-300)
    return bool(((a - b).abs().max() / scale) < rtol)


def structured_reference(structure: str, F: torch.Tensor, model: nn.Module) -> torch.Tensor:
    if structure in ("dense", "implicit"):
        return F
    if structure == "diag":
        return torch.diag(F.diagonal())
    return torch.where(block_mask(model, F.shape[0]), F, torch.zeros_like(F))


# -- tests -----------------------------------------------------------------------------------------
CASES = [
    (m, lik) for m in MODELS for lik in LIKELIHOODS if not (m == "tied" and lik != "categorical")
]


@pytest.mark.parametrize("structure", ["dense", "block_diag", "diag", "implicit"])
@pytest.mark.parametrize("model_name,likelihood", CASES)
def test_exact_fisher_matches_brute_force(
    model_name: str, likelihood: str, structure: str, device: torch.device
) -> None:
    model, x, y = make(model_name, likelihood, device=device)
    F_ref = exact_reference(model, x, y, likelihood)
    F = fl.fisher(model, (x, y), likelihood=likelihood, structure=structure)
    assert F.shape == F_ref.shape
    expected = structured_reference(structure, F_ref, model)
    assert close(F.to_dense(), expected)
    assert close(F.diagonal(), F_ref.diagonal())
    assert F.device == x.device
    v = torch.randn(F.shape[-1], device=device)
    assert close(F @ v, expected @ v)
    V = torch.randn(F.shape[-1], 3, device=device)
    assert close(F @ V, expected @ V)
    assert close(fl.quad(F, v), v @ expected @ v)
    assert close(fl.trace(F), F_ref.trace())
    assert close(fl.frobenius_norm(F), torch.linalg.matrix_norm(expected))


@pytest.mark.parametrize("structure", ["dense", "block_diag", "diag", "implicit"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "seq", "raw_param", "shared"])
def test_empirical_fisher_matches_brute_force(
    model_name: str, structure: str, device: torch.device
) -> None:
    model, x, y = make(model_name, "categorical", device=device)
    F_ref = empirical_reference(model, x, y, "categorical")
    F = fl.fisher(
        model, [(x[:4], y[:4]), (x[4:], y[4:])], structure=structure, fisher_type="empirical"
    )
    assert close(F.to_dense(), structured_reference(structure, F_ref, model))


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_mc_fisher_converges_to_the_exact_fisher(likelihood: str) -> None:
    model, x, y = make("mlp", likelihood)
    exact = exact_reference(model, x, y, likelihood).diagonal()
    errors = []
    for samples in (10, 1000):
        gen = torch.Generator().manual_seed(0)
        F = fl.fisher(
            model,
            (x, y),
            likelihood=likelihood,
            structure="diag",
            fisher_type="mc",
            mc_samples=samples,
            generator=gen,
        )
        errors.append(float((F.diagonal() - exact).norm() / exact.norm()))
    assert errors[1] < errors[0] / 3
    assert errors[1] < 0.1


def test_mc_products_of_the_implicit_fisher_match_its_dense_form() -> None:
    model, x, y = make("cnn", "categorical")
    gen = torch.Generator().manual_seed(0)
    F = fl.fisher(
        model, (x, y), structure="implicit", fisher_type="mc", mc_samples=3, generator=gen
    )
    gen = torch.Generator().manual_seed(0)
    D = fl.fisher(model, (x, y), structure="dense", fisher_type="mc", mc_samples=3, generator=gen)
    v = torch.randn(F.shape[-1])
    assert close(F @ v, D @ v)
    assert close(F.to_dense(), D.to_dense())


def test_float32_is_within_1e_4_of_the_float64_reference() -> None:
    model, x, y = make("cnn", "categorical")
    F_ref = exact_reference(model, x, y, "categorical")
    model32 = copy.deepcopy(model).float()
    for structure in ("dense", "diag", "implicit", "block_diag"):
        F = fl.fisher(model32, (x.float(), y), structure=structure)
        assert F.dtype == torch.float32
        assert close(
            F.to_dense().double(), structured_reference(structure, F_ref, model), rtol=1e-4
        )
    model, x, y = make("mlp", "categorical")
    F64 = fl.fisher(model, (x, y), structure="kfac")
    F32 = fl.fisher(copy.deepcopy(model).float(), (x.float(), y), structure="kfac")
    assert close(F32.to_dense().double(), F64.to_dense(), rtol=1e-4)


def test_params_restricts_to_a_subset_in_public_order() -> None:
    model, x, y = make("mlp", "categorical")
    F_ref = exact_reference(model, x, y, "categorical")
    # parameters of layers 2 and 4: positions of their weight and bias in the full vector
    layout = fl.ParamLayout.from_model(model)
    names = ["2.weight", "2.bias", "4.weight", "4.bias"]
    idx = torch.cat([torch.arange(e.start, e.stop) for e in layout.entries if e.name in names])
    for structure in ("dense", "implicit", "diag"):
        F = fl.fisher(
            model, (x, y), structure=structure, params=[model[2], model[4].weight, model[4].bias]
        )
        expected = structured_reference(structure, F_ref[idx][:, idx], model)
        assert close(F.to_dense(), expected)


def test_data_loader_and_dict_inputs() -> None:
    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(3)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.net(features)

    torch.manual_seed(0)
    model = DictModel().double()
    x, y = torch.randn(N, 4), torch.randint(0, 3, (N,))
    ref = fl.fisher(model.net, (x, y), structure="dense").to_dense()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    assert close(fl.fisher(model.net, loader, structure="dense").to_dense(), ref)
    dict_batches = [({"features": x[:3]}, y[:3]), ({"features": x[3:]}, y[3:])]
    assert close(fl.fisher(model, dict_batches, structure="dense").to_dense(), ref)
    assert close(fl.fisher(model, dict_batches, structure="implicit").to_dense(), ref)


def test_implicit_damped_solve_by_cg_meets_its_tolerance() -> None:
    model, x, y = make("cnn", "categorical")
    F = fl.fisher(model, (x, y), structure="implicit").add_diagonal(torch.tensor(1e-2))
    D = F.to_dense()
    b = torch.randn(F.shape[-1], 2)
    assert close(F.solve(b), torch.linalg.solve(D, b), rtol=1e-8)
    assert close(F.solve(b[:, 0]), torch.linalg.solve(D, b[:, 0]), rtol=1e-8)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_lowrank_by_lanczos_matches_the_top_eigenpairs_of_brute_force(
    model_name: str, monkeypatch
) -> None:
    """structure="lowrank" through its iterative route (Lanczos on exact implicit products; the
    exact-SVD route switched off) on every test model: the top-3 eigenpairs of the float64
    reference."""
    from fim_linops.builders import lowrank

    monkeypatch.setattr(lowrank, "SVD_MAX_BYTES", 0)
    model, x, y = make(model_name, "categorical")
    F_ref = exact_reference(model, x, y, "categorical")
    lam, q = torch.linalg.eigh(F_ref)
    k = 3
    F = fl.fisher(model, (x, y), structure="lowrank", rank=k)
    assert close(torch.sort(F.evals, descending=True).values, lam.flip(0)[:k])
    expected = (q[:, -k:] * lam[-k:]) @ q[:, -k:].T
    assert close(F.to_dense(), expected, rtol=1e-7)
