"""KFAC against its definition: factors from brute-force layer inputs and output Jacobians, exact
where the approximation is exact, and its exact linear algebra against its own dense form."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fim_linops as fl

pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    scale = b.abs().max().clamp_min(1e-300)
    return bool(((a - b).abs().max() / scale) < rtol)


def output_hessian(f: torch.Tensor) -> torch.Tensor:
    """Categorical: diag(p) - p p^T, (N, C, C)."""
    p = torch.softmax(f, -1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def layer_kfac_reference(model: nn.Module, x: torch.Tensor, layers: list[nn.Module]) -> list[tuple]:
    """Per layer (G, A): A = 1/(N T) sum over rows of [a; 1][a; 1]^T (one-hot counts for an
    Embedding), G = 1/N sum_n sum_t J_{n,t}^T H_n J_{n,t}, J_{n,t} = d f_n / d s_{n,t} computed one
    output at a time by autograd (brute force)."""
    inputs, outputs = {}, {}

    def hook(m, i, o):
        inputs[m] = i[0].detach()
        outputs[m] = o
        return o

    handles = [m.register_forward_hook(hook) for m in layers]
    f = model(x)
    for h in handles:
        h.remove()
    n, c = f.shape
    h = output_hessian(f.detach())
    result = []
    for m in layers:
        s = outputs[m]
        cols = [torch.autograd.grad(f[:, k].sum(), s, retain_graph=True)[0] for k in range(c)]
        jac = torch.stack(cols, 1).reshape(n, c, -1, s.shape[-1])  # (n, c, t, o)
        g = torch.einsum("ncto,ncd,ndtp->op", jac, h, jac) / n
        a = inputs[m]
        if isinstance(m, nn.Embedding):
            counts = nn.functional.one_hot(a.reshape(-1), m.num_embeddings).sum(0).double()
            result.append((g, torch.diag(counts) / a.numel()))
            continue
        rows = a.reshape(-1, a.shape[-1])
        if m.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, device=rows.device)], 1)
        result.append((g, rows.T @ rows / rows.shape[0]))
    return result


def public_kron(g: torch.Tensor, a: torch.Tensor, out: int, inp: int, bias: bool) -> torch.Tensor:
    """G kron A over row-major [W | b], permuted into the public order (W row-major, then b)."""
    k = torch.kron(g.contiguous(), a.contiguous())
    cols = inp + (1 if bias else 0)
    order = [o * cols + i for o in range(out) for i in range(inp)]
    if bias:
        order += [o * cols + inp for o in range(out)]
    idx = torch.tensor(order, device=k.device)
    return k[idx][:, idx]


def exact_fisher(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return fl.fisher(
        model, (x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)), structure="dense"
    ).to_dense()


@pytest.mark.parametrize("bias", [True, False])
def test_kfac_is_exact_for_one_example_of_one_linear_layer(bias: bool, device) -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=bias).to(device)
    x = torch.randn(1, 5).to(device)
    F = fl.fisher(model, (x, torch.zeros(1, dtype=torch.long, device=device)), structure="kfac")
    assert close(F.to_dense(), exact_fisher(model, x))


def test_kfac_is_exact_for_one_example_of_one_conv_layer_with_one_output_position() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten())
    x = torch.randn(1, 2, 3, 3)
    F = fl.fisher(model, (x, torch.zeros(1, dtype=torch.long)), structure="kfac")
    assert close(F.to_dense(), exact_fisher(model, x))


def test_grouped_conv_kfac_is_exact_within_groups_and_zero_across() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten())
    x = torch.randn(1, 4, 3, 3)
    F = fl.fisher(model, (x, torch.zeros(1, dtype=torch.long)), structure="kfac").to_dense()
    exact = exact_fisher(model, x)
    # weight (4, 2, 3, 3): output channels 0-1 in group 0, 2-3 in group 1; then bias (4,)
    group = torch.cat([torch.arange(4).repeat_interleave(18), torch.arange(4)]) // 2
    same = group[:, None] == group[None, :]
    assert close(F, torch.where(same, exact, torch.zeros_like(exact)))
    assert bool((exact[~same].abs() > 1e-8).any())  # the cross-group terms KFAC drops are real


def test_kfac_matches_its_definition_on_an_mlp(device) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model[2].bias.requires_grad_(False)
    model = model.to(device)
    x = torch.randn(9, 4).to(device)
    y = torch.zeros(9, dtype=torch.long, device=device)
    F = fl.fisher(
        model,
        [(x[:5], y[:5]), (x[5:], y[5:])],
        structure="kfac",
    )
    layers = [model[0], model[2], model[4]]
    refs = layer_kfac_reference(model, x, layers)
    blocks = []
    for m, (g, a) in zip(layers, refs, strict=True):
        bias = m.bias is not None and m.bias.requires_grad
        if not bias and m.bias is not None:
            a = a[:-1, :-1]
        blocks.append(public_kron(g, a, m.out_features, m.in_features, bias))
    assert close(F.to_dense(), torch.block_diag(*blocks))


def test_kfac_expand_on_a_sequence_model_with_an_embedding() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.lin = nn.Linear(4, 5)
            self.out = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.lin(self.emb(x))).mean(1))

    torch.manual_seed(0)
    model = Seq()
    x = torch.randint(0, 7, (6, 4))
    F = fl.fisher(model, (x, torch.zeros(6, dtype=torch.long)), structure="kfac")
    refs = layer_kfac_reference(model, x, [model.emb, model.lin, model.out])
    (g_e, a_e), (g_l, a_l), (g_o, a_o) = refs
    emb_block = torch.kron(a_e.contiguous(), g_e.contiguous())  # W (V, D) row-major: A on the rows
    expected = torch.block_diag(
        emb_block, public_kron(g_l, a_l, 5, 4, True), public_kron(g_o, a_o, 3, 5, True)
    )
    assert close(F.to_dense(), expected)


def test_kfac_refuses_layers_it_cannot_factorise_and_names_them() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="'1' \\(nn.LayerNorm.*per-layer mix"):
        fl.fisher(model, (x, torch.zeros(5, dtype=torch.long)), structure="kfac", strict=True)
    F = fl.fisher(
        model, (x, torch.zeros(5, dtype=torch.long)), structure="kfac", params=[model[0], model[2]]
    )
    assert F.shape[-1] == 4 * 6 + 6 + 6 * 3 + 3


# -- exact linear algebra of every stored structure against its own dense form -----------------------
@functools.cache
def operators() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 16, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    )
    model = model.double()
    x = torch.randn(40, 2, 4, 4, dtype=torch.float64)
    y = torch.zeros(40, dtype=torch.long)
    return {
        s: fl.fisher(model, (x, y), structure=s) for s in ("dense", "block_diag", "diag", "kfac")
    }


STRUCTURES = ["dense", "block_diag", "diag", "kfac"]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_exact_algebra_matches_the_dense_form(structure: str, damping: float) -> None:
    F = operators()[structure]
    D = F.to_dense()
    p = D.shape[0]
    Fd = F.add_diagonal(torch.tensor(damping))
    assert type(Fd) is type(F)  # damping stays structural
    Dd = D + damping * torch.eye(p)
    assert close(Fd.to_dense(), Dd)
    b = torch.randn(p, 2)
    assert close(Fd.solve(b), torch.linalg.solve(Dd, b), rtol=1e-8)
    assert close(Fd.solve(b[:, 0]), torch.linalg.solve(Dd, b[:, 0]), rtol=1e-8)
    inv_quad, logdet = Fd.inv_quad_logdet(b, logdet=True)
    assert close(logdet, torch.logdet(Dd))
    assert close(inv_quad, (b * torch.linalg.solve(Dd, b)).sum(), rtol=1e-8)
    root = Fd.root_decomposition().root.to_dense()
    assert close(root @ root.T, Dd)
    evals, evecs = Fd.eigh()
    assert close(torch.sort(evals).values, torch.linalg.eigvalsh(Dd), rtol=1e-9)
    q = evecs.to_dense()
    assert close(q @ torch.diag(evals) @ q.T, Dd, rtol=1e-9)
    assert close(F.diagonal(), D.diagonal())
    assert close(fl.trace(Fd), Dd.trace())
    assert close(fl.frobenius_norm(Fd), torch.linalg.matrix_norm(Dd))
    assert close((2.0 * F).to_dense(), 2 * D)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_operators_move_between_dtypes_and_survive_pickling(structure: str, tmp_path) -> None:
    F = operators()[structure]
    F32 = F.to(torch.float32)
    assert F32.dtype == torch.float32
    assert close(F32.to_dense().double(), F.to_dense(), rtol=1e-6)
    path = tmp_path / "op.pt"
    torch.save(F, path)
    G = torch.load(path, weights_only=False)
    assert close(G.to_dense(), F.to_dense(), rtol=1e-15)


def test_undamped_singular_solve_is_the_pseudo_inverse() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    x = torch.randn(2, 5)  # rank-deficient: 2 examples
    F = fl.fisher(model, (x, torch.zeros(2, dtype=torch.long)), structure="kfac")
    b = torch.randn(F.shape[-1])
    assert close(F.solve(b), torch.linalg.pinv(F.to_dense(), hermitian=True) @ b, rtol=1e-8)


def test_kfac_reduce_on_a_sequence_model_matches_its_definition() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 2))
    x = torch.randn(6, 5, 3)  # the first Linear sees 5 positions per example
    y = torch.zeros(6, dtype=torch.long)
    F = fl.fisher(model, (x, y), structure="kfac", kfac_approx="reduce")
    inputs, outputs = {}, {}

    def hook(m, i, o):
        inputs[m], outputs[m] = i[0].detach(), o
        return o

    h = model[0].register_forward_hook(hook)
    f = model(x)
    h.remove()
    s = outputs[model[0]]
    jac = torch.stack(
        [torch.autograd.grad(f[:, k].sum(), s, retain_graph=True)[0] for k in range(2)], 1
    )
    jsum = jac.sum(2)  # (n, c, o): gradients summed over positions
    g = torch.einsum("nco,ncd,ndp->op", jsum, output_hessian(f.detach()), jsum) / 6
    abar = torch.cat([inputs[model[0]].mean(1), torch.ones(6, 1)], 1)
    a = abar.T @ abar / 6
    first = public_kron(g, a, 4, 3, True)
    assert close(F.to_dense()[: first.shape[0], : first.shape[0]], first)
    expand = fl.fisher(model, (x, y), structure="kfac")
    assert not close(expand.to_dense()[:16, :16], first)  # the two conventions differ here
    last = slice(first.shape[0], None)  # one position: reduce == expand
    assert close(F.to_dense()[last, last], expand.to_dense()[last, last])
    with pytest.raises(ValueError, match="kfac_approx"):
        fl.fisher(model, (x, y), structure="kfac", kfac_approx="average")


class _Accumulate(nn.Module):
    """A grouped strided conv, a sequence Linear (3-d inputs), a weight-only Linear and a
    Linear whose weight is frozen (bias only): every in-place accumulation path of the factors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.seq = nn.Linear(6, 5)
        self.nobias = nn.Linear(5, 4, bias=False)
        self.head = nn.Linear(4, 3)
        self.head.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)  # (N, L, 6)
        h = torch.tanh(self.seq(h)).mean(1)
        return self.head(torch.tanh(self.nobias(h)))


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_factors_accumulated_over_batches_equal_one_batch(fisher_type: str) -> None:
    torch.manual_seed(0)
    model = _Accumulate()
    x, y = torch.randn(9, 4, 6, 6), torch.randint(0, 3, (9,))
    kw = {"structure": "kfac", "fisher_type": fisher_type}
    one = fl.fisher(model, (x, y), **kw)
    three = fl.fisher(model, [(x[:2], y[:2]), (x[2:6], y[2:6]), (x[6:], y[6:])], **kw)
    assert len(three.factors) == 8  # conv, seq, nobias, head (bias only)
    for a, b in zip(three.factors, one.factors, strict=True):
        assert close(a, b)
    assert close(three.to_dense(), one.to_dense())
