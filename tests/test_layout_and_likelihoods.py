"""ParamLayout follows parameters_to_vector; likelihoods: nll, sampling, S S^T = H."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, vmap

import fim_linops as fl


class TiedAndFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mid = nn.Linear(3, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight  # tied: appears once, at its first name
        self.mid.bias.requires_grad_(False)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.emb(x).mean(1))) / self.temperature


def test_layout_order_is_parameters_to_vector_over_trainable_parameters() -> None:
    model = TiedAndFrozen()
    layout = fl.ParamLayout.from_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert layout.names == ["temperature", "emb.weight", "mid.weight"]
    vec = torch.nn.utils.parameters_to_vector(trainable)
    assert torch.equal(layout.vector(), vec)
    assert layout.numel == vec.numel()
    parts = layout.unflatten(vec)
    assert all(torch.equal(parts[n], p) for n, p in zip(layout.names, trainable, strict=True))
    assert torch.equal(layout.flatten(parts), vec)
    assert torch.equal(layout.flatten([parts[n] for n in layout.names]), vec)
    # batched: a leading dim is kept
    batch = torch.stack([vec, 2 * vec])
    assert torch.equal(layout.flatten(layout.unflatten(batch)), batch)
    # blocks: one per owning module, contiguous
    assert [b.module_name for b in layout.blocks] == ["", "emb", "mid"]
    assert [(b.start, b.stop) for b in layout.blocks] == [(0, 1), (1, 16), (16, 25)]


def test_layout_params_subset_by_module_and_parameter() -> None:
    model = TiedAndFrozen()
    layout = fl.ParamLayout.from_model(model, params=[model.mid, model.temperature])
    assert layout.names == ["temperature", "mid.weight"]  # model order, frozen bias skipped
    with pytest.raises(ValueError, match="frozen parameter"):
        fl.ParamLayout.from_model(model, params=[model.mid.bias])
    with pytest.raises(ValueError, match="flatten: missing"):
        layout.flatten({"temperature": torch.ones(())})
    with pytest.raises(ValueError, match="unflatten: expected a vector of length 10"):
        layout.unflatten(torch.zeros(3))


def _nll_reference(name: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "categorical":
        return nn.functional.cross_entropy(f, y, reduction="none")
    if name == "bernoulli":
        return nn.functional.binary_cross_entropy_with_logits(f[:, 0], y, reduction="none")
    return -torch.distributions.Normal(f, 0.7).log_prob(y).sum(-1)


LIKS = {
    "categorical": fl.Categorical(),
    "gaussian": fl.Gaussian(sigma=0.7),
    "bernoulli": fl.Bernoulli(),
}


@pytest.mark.parametrize("name", list(LIKS))
def test_likelihood_nll_hessian_sqrt_and_grad_output(name: str) -> None:
    torch.manual_seed(0)
    lik = LIKS[name]
    c = 1 if name == "bernoulli" else 4
    f = torch.randn(6, c, dtype=torch.float64)
    y = {
        "categorical": torch.randint(0, c, (6,)),
        "gaussian": torch.randn(6, c, dtype=torch.float64),
        "bernoulli": torch.randint(0, 2, (6,)).double(),
    }[name]
    assert torch.allclose(lik.nll(f, y), _nll_reference(name, f, y))
    h = vmap(hessian(lambda fn, yn: lik.nll(fn[None], yn[None])[0]))(f, y)
    s = lik.hessian_sqrt(f)
    assert torch.allclose(s @ s.transpose(1, 2), h, atol=1e-12)
    v = torch.randn(3, 6, c, dtype=torch.float64)
    assert torch.allclose(lik.hessian_matmul(f, v), torch.einsum("ncd,knd->knc", h, v), atol=1e-12)
    g = torch.func.grad(lambda ff: lik.nll(ff, y).sum())(f)
    assert torch.allclose(lik.grad_output(f, y), g)
    ys = lik.sample(f, 5, generator=torch.Generator().manual_seed(0))  # (S, N) sampled labels
    per_sample = torch.stack([lik.grad_output(f, ys[s]) for s in range(5)])
    assert torch.equal(lik.grad_output(f, ys), per_sample)
    fused = lik.sampled_grad_output(f, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fused, lik.grad_output(f, ys), atol=1e-15)


@pytest.mark.parametrize("name", list(LIKS))
def test_sampling_is_reproducible_and_has_the_right_distribution(name: str) -> None:
    lik = LIKS[name]
    c = 1 if name == "bernoulli" else 3
    f = torch.tensor([[0.5, -1.0, 2.0][:c], [0.0, 0.3, -0.2][:c]], dtype=torch.float64)
    a = lik.sample(f, 20000, generator=torch.Generator().manual_seed(0))
    b = lik.sample(f, 20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    if name == "categorical":
        freq = nn.functional.one_hot(a, c).double().mean(0)
        assert torch.allclose(freq, torch.softmax(f, -1), atol=0.02)
    elif name == "bernoulli":
        assert torch.allclose(a.mean(0), torch.sigmoid(f[:, 0]), atol=0.02)
    else:
        assert torch.allclose(a.mean(0), f, atol=0.03)
        assert torch.allclose(a.std(0), torch.full_like(f, 0.7), atol=0.03)


def test_categorical_samples_stay_in_range_at_extreme_logits() -> None:
    """The inverse-CDF sampler never returns C (float32 cumulative sums may end below 1) and puts
    all mass on a class whose probability rounds to 1."""
    f = torch.tensor([[80.0, 0.0, -80.0], [0.0, 0.0, 100.0], [1e-3, 2e-3, 3e-3]])
    y = fl.Categorical().sample(f, 5000, generator=torch.Generator().manual_seed(1))
    assert y.shape == (5000, 3) and int(y.min()) >= 0 and int(y.max()) <= 2
    assert bool((y[:, 0] == 0).all()) and bool((y[:, 1] == 2).all())


def test_likelihoods_by_name_and_errors() -> None:
    assert isinstance(fl.get_likelihood("categorical"), fl.Categorical)
    assert isinstance(fl.get_likelihood("gaussian"), fl.Gaussian)
    assert isinstance(fl.get_likelihood("bernoulli"), fl.Bernoulli)
    with pytest.raises(ValueError, match="sigma must be a positive"):
        fl.Gaussian(sigma=0.0)
    with pytest.raises(ValueError, match="labels in \\{0, 1\\}"):
        fl.Bernoulli().check_target(torch.zeros(3, 1), torch.tensor([0.0, 2.0, 1.0]))


def test_progress_bar_runs(capsys) -> None:
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    F = fl.fisher(model, batches, structure="diag", progress=True)
    assert F.shape == (8, 8)
    assert "fisher" in capsys.readouterr().err


@pytest.mark.parametrize("structure", ["dense", "diag", "kfac", "implicit"])
def test_gaussian_accepts_a_scalar_output_per_example(structure: str) -> None:
    """Regression models often return (N,) (``.squeeze(-1)``): the same Fisher as (N, 1)."""
    torch.manual_seed(0)
    column = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    flat = nn.Sequential(column, nn.Flatten(0))
    x, y = torch.randn(6, 3), torch.randn(6)
    want = fl.fisher(column, (x, y[:, None]), likelihood="gaussian", structure=structure)
    got = fl.fisher(flat, (x, y), likelihood=fl.Gaussian(), structure=structure)
    torch.testing.assert_close(got.to_dense(), want.to_dense())
    assert torch.linalg.matrix_norm(want.to_dense()) > 0


def test_params_by_name() -> None:
    """params= accepts the names of parameters and modules, the same as the objects."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    by_object = fl.fisher(model, (x, y), params=[model[0].weight, model[2]], structure="diag")
    by_name = fl.fisher(model, (x, y), params=["0.weight", "2"], structure="diag")
    torch.testing.assert_close(by_name.diagonal(), by_object.diagonal())
    assert fl.ParamLayout.from_model(model, "2").names == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="'0.wieght'.*close names: '0.weight'|neither a parameter"):
        fl.fisher(model, (x, y), params=["0.wieght"], structure="diag")


def test_labels_as_numpy_or_list_next_to_a_tensor_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    want = fl.fisher(model, (x, y), structure="diag", fisher_type="empirical").diagonal()
    for labels in (y.numpy(), y.tolist()):
        got = fl.fisher(model, (x, labels), structure="diag", fisher_type="empirical")
        torch.testing.assert_close(got.diagonal(), want)
