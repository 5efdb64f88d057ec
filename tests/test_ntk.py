"""fl.jacobian and fl.ntk against brute force: J from torch.func.jacrev (float64), Theta = J1 J2^T,
on an MLP, CNNs (stride, padding, dilation, groups, Conv1d), an Embedding + LayerNorm sequence
model, modules with raw parameters, a module called twice, frozen parameters; every structure,
every output mode, streaming over several batches."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import fim_linops.ntk  # noqa: F401
from fim_linops.engine.rules.conv import ConvRule
from fim_linops.engine.rules.linear import LinearRule

fntk = sys.modules["fim_linops.ntk"]  # the module (fl.ntk may be the function)


pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


class Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class RawParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.sc, self.l2 = nn.Linear(4, 6), Scale(6), nn.Linear(6, 3)
        self.offset = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.sc(self.l1(x)))) + self.offset


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l, self.o = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.l(torch.tanh(self.l(x)))))


class Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(self.norm(self.emb(x)))).mean(1))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, dilation=2, groups=2, padding="same", padding_mode="reflect")
        self.c3 = nn.Conv2d(4, 3, 4, bias=False)  # one output position: the structured Gram
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(torch.tanh(self.c3(h)).flatten(1))


class CNN1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(2, 3, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(1, 3)
        self.fc = nn.Linear(27, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gn(torch.tanh(self.c(x))).flatten(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))


def frozen() -> nn.Module:
    m = mlp()
    m[2].weight.requires_grad_(False)
    m[4].bias.requires_grad_(False)
    return m


MODELS = {
    "mlp": (mlp, lambda n: torch.randn(n, 5)),
    "cnn": (CNN, lambda n: torch.randn(n, 2, 8, 8)),
    "cnn1d": (CNN1d, lambda n: torch.randn(n, 2, 17)),
    "seq": (Seq, lambda n: torch.randint(0, 11, (n, 5))),
    "raw": (RawParam, lambda n: torch.randn(n, 4)),
    "twice": (Twice, lambda n: torch.randn(n, 4)),
    "frozen": (frozen, lambda n: torch.randn(n, 5)),
}


def ref_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N*C, P) by torch.func.jacrev, trainable parameters in named_parameters order."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    jac = jacrev(lambda p: functional_call(model, p, (x,)).reshape(x.shape[0], -1))(params)
    n, c = jac[next(iter(params))].shape[:2]
    return torch.cat([jac[k].reshape(n * c, -1) for k in params], dim=1)


def ref_ntk(model, x1, x2, outputs):
    j1 = ref_jacobian(model, x1)
    j2 = j1 if x2 is None else ref_jacobian(model, x2)
    n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
    c = j1.shape[0] // n1
    if outputs == "full":
        return j1 @ j2.T
    t1, t2 = j1.reshape(n1, c, -1), j2.reshape(n2, c, -1)
    if outputs == "sum":
        return torch.einsum("ncp,mcp->nm", t1, t2)
    return t1[:, outputs] @ t2[:, outputs].T


def build(name: str, seed: int = 0, device: torch.device | str = "cpu"):
    """Model and two inputs, seeded on CPU (the same numbers on every device), on ``device``."""
    torch.manual_seed(seed)
    make, data = MODELS[name]
    return make().eval().to(device), data(7).to(device), data(5).to(device)


@pytest.mark.parametrize("name", list(MODELS))
def test_jacobian_products_and_dense_equal_jacrev(name, device):
    model, x, _ = build(name, device=device)
    ref = ref_jacobian(model, x)
    jac = fntk.jacobian(model, x, batch_size=3)
    assert jac.shape == ref.shape
    torch.testing.assert_close(jac.to_dense(), ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(ref.shape[1], 3, device=device)
    u = torch.randn(ref.shape[0], 2, device=device)
    torch.testing.assert_close(jac @ v, ref @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jac.T @ u, ref.T @ u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jac.T.to_dense(), ref.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("structure", ["dense", "implicit", "lowrank"])
@pytest.mark.parametrize("outputs", ["full", "sum", 1])
@pytest.mark.parametrize("cross", [False, True])
def test_ntk_equals_j1_j2t(name, structure, outputs, cross, device):
    model, x1, x2 = build(name, device=device)
    x2 = x2 if cross else None
    ref = ref_ntk(model, x1, x2, outputs)
    op = fntk.ntk(model, x1, x2, structure=structure, outputs=outputs, batch_size=3)
    assert op.shape == ref.shape
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(ref.shape[1], 2, device=device)
    torch.testing.assert_close(op @ v, ref @ v, rtol=1e-10, atol=1e-12)
    if not cross:
        torch.testing.assert_close(op.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)


def test_implicit_transpose_is_the_swapped_kernel():
    model, x1, x2 = build("mlp")
    op = fntk.ntk(model, x1, x2)
    ref = ref_ntk(model, x1, x2, "full")
    torch.testing.assert_close(op.mT.to_dense(), ref.T, rtol=1e-10, atol=1e-12)
    u = torch.randn(ref.shape[0], 2)
    torch.testing.assert_close(op.mT @ u, ref.T @ u, rtol=1e-10, atol=1e-12)


def test_sequence_linear_uses_structured_gram_and_matches():
    """Linear on (N, T, i) inputs with T small: the (a, g) route with positions."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Flatten(), nn.Linear(32, 2))
    x = torch.randn(6, 2, 16)
    a, g = torch.randn(6, 2, 16), torch.randn(2, 6, 2, 16)
    assert LinearRule().gram_from_ag(model[0], a, g, ("weight", "bias"))
    ref = ref_ntk(model, x, None, "full")
    torch.testing.assert_close(
        fntk.ntk(model, x, structure="dense").to_dense(), ref, rtol=1e-10, atol=1e-12
    )


def test_conv_gram_routes_both_match():
    """The patch route (one output position) and the gradient route (many positions) agree."""
    model, x, _ = build("cnn")
    rule = ConvRule()
    a = torch.randn(7, 1, 1, 64)  # patches (N, groups, L, J)
    assert rule.gram_from_ag(model.c3, a, torch.randn(3, 7, 3, 1, 1), ("weight",))
    assert not rule.gram_from_ag(
        model.c1, torch.randn(7, 1, 16, 18), torch.randn(3, 7, 4, 4, 4), ("weight", "bias")
    )


def test_ntk_leaves_model_as_found():
    model, x1, _ = build("cnn")
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    fntk.ntk(model, x1, structure="dense").to_dense()
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_bad_outputs_and_structure_raise():
    model, x1, _ = build("mlp")
    with pytest.raises(ValueError, match="outputs"):
        fntk.ntk(model, x1, outputs="mean")
    with pytest.raises(ValueError, match="structure"):
        fntk.ntk(model, x1, structure="kfac")
    with pytest.raises(ValueError, match="out of range"):
        fntk.ntk(model, x1, outputs=5)


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq", "raw", "frozen"])
@pytest.mark.parametrize("outputs", ["full", "sum"])
def test_symmetric_gram_by_mirrored_tiles_equals_j_jt(name, outputs, monkeypatch):
    """The symmetric dense Gram computes tiles of examples on and below the diagonal (also inside
    one batch) and mirrors the others: equal to J J^T with many uneven tiles."""
    import fim_linops.engine.gram as gram

    monkeypatch.setattr(gram, "MIN_TILE", 2)
    monkeypatch.setattr(gram, "MAX_TILES_PER_BATCH", 3)
    torch.manual_seed(3)
    make, data = MODELS[name]
    model, x = make().eval(), data(11)
    ref = ref_ntk(model, x, None, outputs)
    for size in (4, None):  # batches 4, 4, 3 (tiles of 2) and one batch (tiles of 4, 4, 3)
        got = fntk.ntk(model, x, structure="dense", outputs=outputs, batch_size=size).to_dense()
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
