"""EKFAC, quasi-diagonal, low-rank, Kronecker-sum and per-layer mixed Fishers against dense float64
references built by torch.func (per-example Jacobians by jacrev, F = 1/N sum_n J_n^T H_n J_n), and
their exact linear algebra against their own dense form."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

import fim_linops as fl
from fim_linops.operators import EKFAC

pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references


N = 7


# -- models ---------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


class Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(self.emb(x))).mean(1))


class Twice(nn.Module):
    """One Linear called twice (its statistics sum over the calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.l, self.o = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.l(torch.tanh(self.l(x)))))


def conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))


def normed() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


MODELS = {
    "mlp": (mlp, lambda: torch.randn(N, 4)),
    "cnn": (cnn, lambda: torch.randn(N, 2, 5, 5)),
    "seq": (Seq, lambda: torch.randint(0, 7, (N, 3))),
    "twice": (Twice, lambda: torch.randn(N, 4)),
    "normed": (normed, lambda: torch.randn(N, 4)),
    "conv": (conv, lambda: torch.randn(N, 2, 5, 5)),
}
KRON_MODELS = ["mlp", "cnn", "seq", "twice"]


def make(
    name: str, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Model and (x, y), seeded on CPU (the same numbers on every device), on ``device``."""
    torch.manual_seed(seed)
    factory, inputs = MODELS[name]
    model = factory().double()
    x = inputs()
    return model.to(device), (x.to(device), torch.randint(0, 3, (N,)).to(device))


# -- brute-force reference --------------------------------------------------------------------------
def reference_fisher(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """1/N sum_n J_n^T H_n J_n (categorical), J_n by jacrev, H_n by torch.func.hessian."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(p, xn):
        return functional_call(model, p, (xn[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    j = torch.cat([jac[n].reshape(x.shape[0], -1, params[n].numel()) for n in params], -1)
    with torch.no_grad():
        out = model(x)
    h = vmap(hessian(lambda fn: torch.logsumexp(fn, -1)))(out)
    return torch.einsum("ncp,ncd,ndq->pq", j, h, j) / x.shape[0]


def block_mask(model: nn.Module, size: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool, device=next(model.parameters()).device)
    for b in fl.ParamLayout.from_model(model).blocks:
        mask[b.start : b.stop, b.start : b.stop] = True
    return mask


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    scale = b.abs().max().clamp_min(1e-300)
    return bool(((a - b).abs().max() / scale) < rtol)


@functools.cache
def reference(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    model, (x, _) = make(name, device=device)
    return reference_fisher(model, x)


# -- EKFAC ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", KRON_MODELS)
def test_ekfac_is_the_exact_fisher_diagonal_in_the_kfac_eigenbasis(name: str, device) -> None:
    model, data = make(name, device=device)
    F_ref = reference(name, device)
    kfac = fl.fisher(model, data, structure="kfac")
    ekfac = fl.fisher(model, data, structure="ekfac")
    assert isinstance(ekfac, EKFAC)
    e = kfac.eigh()[1].to_dense()
    s = torch.einsum("pi,pq,qi->i", e, F_ref, e)  # e_i^T F e_i
    assert close(ekfac.to_dense(), e @ torch.diag(s) @ e.T)


@pytest.mark.parametrize("name", KRON_MODELS)
def test_ekfac_is_at_least_as_close_as_kfac_to_the_exact_fisher(name: str, device) -> None:
    model, data = make(name, device=device)
    F_ref = reference(name, device)
    kfac = fl.fisher(model, data, structure="kfac").to_dense()
    ekfac = fl.fisher(model, data, structure="ekfac").to_dense()
    err_kfac = torch.linalg.matrix_norm(kfac - F_ref)
    err_ekfac = torch.linalg.matrix_norm(ekfac - F_ref)
    assert err_ekfac <= err_kfac * (1 + 1e-12)
    # and EKFAC keeps the exact trace of every layer block (KFAC does not in general)
    assert close(torch.trace(ekfac), torch.trace(F_ref))


def test_ekfac_is_exact_for_one_example_of_one_linear_layer() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    x = torch.randn(1, 5)
    F = fl.fisher(model, (x, torch.zeros(1, dtype=torch.long)), structure="ekfac")
    assert close(F.to_dense(), reference_fisher(model, x))


def test_ekfac_mc_reuses_the_sampled_labels_in_its_second_pass() -> None:
    model, data = make("mlp")
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    kfac = fl.fisher(model, data, structure="kfac", fisher_type="mc", mc_samples=2, generator=g1)
    ekfac = fl.fisher(model, data, structure="ekfac", fisher_type="mc", mc_samples=2, generator=g2)
    mc = fl.fisher(
        model,
        data,
        structure="block_diag",
        fisher_type="mc",
        mc_samples=2,
        generator=torch.Generator().manual_seed(3),
    ).to_dense()
    e = kfac.eigh()[1].to_dense()
    s = torch.einsum("pi,pq,qi->i", e, mc, e)
    assert close(ekfac.to_dense(), e @ torch.diag(s) @ e.T)


# -- low rank ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "cnn", "normed"])
@pytest.mark.parametrize("k", [1, 5])
def test_lowrank_holds_the_top_eigenpairs_of_the_exact_fisher(name: str, k: int, device) -> None:
    model, data = make(name, device=device)
    F_ref = reference(name, device)
    F = fl.fisher(model, data, structure="lowrank", rank=k)
    lam, q = torch.linalg.eigh(F_ref)
    expected = (q[:, -k:] * lam[-k:]) @ q[:, -k:].T
    assert close(F.to_dense(), expected, rtol=1e-9)
    assert close(torch.sort(F.evals).values, lam[-k:])


def test_lowrank_by_subspace_iteration_matches_the_svd_route(monkeypatch) -> None:
    from fim_linops.builders import lowrank

    model, data = make("mlp")
    F_svd = fl.fisher(model, data, structure="lowrank", rank=4)
    monkeypatch.setattr(lowrank, "SVD_MAX_BYTES", 0)
    F_it = fl.fisher(model, data, structure="lowrank", rank=4)
    assert close(F_it.evals, F_svd.evals, rtol=1e-9)
    assert close(F_it.to_dense(), F_svd.to_dense(), rtol=1e-8)


@pytest.mark.parametrize("block", [1, 3, 16])
@pytest.mark.parametrize("rank", [3, 40, 200])
def test_lanczos_top_eigenpairs_of_a_dense_matrix(block: int, rank: int) -> None:
    """Close eigenvalues around the k-th (1, 0.99, 0.98, 0.9: thick restarts), blocks of 1, 3
    and 16 columns, rank-deficient operators (rank 3 < k): the top-k pairs of eigh; with a block
    of b >= 2 columns also a doubly repeated eigenvalue."""
    from fim_linops.builders.lowrank import top_eigenpairs

    g = torch.Generator().manual_seed(0)
    p, k = 200, 6
    q = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0]
    head = [5.0, 4.0, 3.0, 2.0, 1.0, 1.0] if block > 1 else [5.0, 4.0, 3.0, 2.0, 1.0]
    lam = torch.cat(
        [torch.tensor(head + [0.99, 0.98]), 0.9 ** torch.arange(1.0, p - len(head) - 1)]
    )
    lam = lam.to(torch.float64)
    lam[rank:] = 0
    a = (q * lam) @ q.T
    u, ev = top_eigenpairs(
        lambda x: a @ x, p, k, torch.float64, torch.device("cpu"), max_iter=5000, block=block
    )
    ref = torch.linalg.eigvalsh(a).flip(0)[:k]
    torch.testing.assert_close(ev, ref, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-8)
    resid = torch.linalg.vector_norm(a @ u - u * ev, dim=0)
    assert bool((resid <= 1e-9 * ev[0]).all())


def test_lanczos_stops_at_the_precision_floor_of_noisy_products() -> None:
    """Products accurate to 1e-7 relative cannot give residuals below ~1e-7 lambda_max: with tol
    1e-8 (floor within 100 tol) the iteration stops once the residuals stall, silently and long
    before max_iter; with tol 1e-12 (floor far above it) it runs to max_iter and warns. The top
    eigenvalues are accurate to ~1e-6 either way."""
    import warnings

    from fim_linops.builders.lowrank import top_eigenpairs

    g = torch.Generator().manual_seed(0)
    p, k = 300, 4
    q = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0]
    lam = (0.95 ** torch.arange(float(p))).to(torch.float64)
    a = (q * lam) @ q.T
    count = [0]

    def noisy(x: torch.Tensor) -> torch.Tensor:
        count[0] += x.shape[1]
        y = a @ x
        return y + 1e-7 * torch.randn(y.shape, generator=g, dtype=y.dtype) * y.norm(dim=0)

    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u, ev = top_eigenpairs(noisy, p, k, torch.float64, cpu, tol=1e-8)
    assert count[0] < 500  # max_iter is 2000 columns
    torch.testing.assert_close(ev, lam[:k], rtol=1e-5, atol=0)
    count[0] = 0
    with pytest.warns(UserWarning, match="did not reach"):
        u, ev = top_eigenpairs(noisy, p, k, torch.float64, cpu, tol=1e-12, max_iter=300)
    assert count[0] >= 300
    torch.testing.assert_close(ev, lam[:k], rtol=1e-5, atol=0)


def test_lowrank_rank_larger_than_p_is_a_clear_error() -> None:
    model, data = make("mlp")
    p = sum(q.numel() for q in model.parameters())
    with pytest.raises(ValueError, match=f"rank={p + 1} exceeds the number of parameters P={p}"):
        fl.fisher(model, data, structure="lowrank", rank=p + 1)
    with pytest.raises(ValueError, match="needs rank=k"):
        fl.fisher(model, data, structure="lowrank")


# -- quasi-diagonal ---------------------------------------------------------------------------------
def quasi_mask(model: nn.Module, size: int) -> torch.Tensor:
    """The diagonal plus (weight row b, bias b) pairs of Linear/Conv/norm layers."""
    mask = torch.eye(size, dtype=torch.bool, device=next(model.parameters()).device)
    for b in fl.ParamLayout.from_model(model).blocks:
        w, bias = b.entry("weight"), b.entry("bias")
        if w is None or bias is None or isinstance(b.module, nn.Embedding):
            continue
        width = w.numel // bias.numel
        for o in range(bias.numel):
            rows = slice(w.start + o * width, w.start + (o + 1) * width)
            mask[rows, bias.start + o] = mask[bias.start + o, rows] = True
    return mask


@pytest.mark.parametrize("name", list(MODELS))
def test_quasi_diag_keeps_the_diagonal_and_each_neurons_weight_bias_terms(
    name: str, device
) -> None:
    model, data = make(name, device=device)
    F_ref = reference(name, device)
    F = fl.fisher(model, data, structure="quasi_diag")
    expected = torch.where(quasi_mask(model, F_ref.shape[0]), F_ref, torch.zeros_like(F_ref))
    assert close(F.to_dense(), expected)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_quasi_diag_closed_forms_match_its_dense_form(damping: float) -> None:
    model, data = make("cnn")
    F = fl.fisher(model, data, structure="quasi_diag").add_diagonal(torch.tensor(damping))
    D = F.to_dense()
    b = torch.randn(D.shape[0], 3)
    assert close(F.solve(b), torch.linalg.solve(D, b), rtol=1e-9)
    inv_quad, logdet = F.inv_quad_logdet(b, logdet=True)
    assert close(inv_quad, (b * torch.linalg.solve(D, b)).sum(), rtol=1e-9)
    if torch.linalg.eigvalsh(D)[0] < 0:  # Ollivier's arrowhead blocks need not be PSD
        assert torch.isnan(logdet) == torch.isnan(torch.logdet(D))
        with pytest.raises(ValueError, match="indefinite"):
            F.root_decomposition()
        return
    assert close(logdet, torch.logdet(D))
    r = F.root_decomposition().root.to_dense()
    assert close(r @ r.T, D)
    s = F.root_inv_decomposition().root.to_dense()
    assert close(s @ s.T, torch.linalg.inv(D), rtol=1e-9)


# -- Kronecker sums ---------------------------------------------------------------------------------
def rearranged_blocks(model: nn.Module, F: torch.Tensor) -> list[torch.Tensor]:
    """Per Linear layer, R(F_block) (rows^2, cols^2) over the row-major [W | b] view."""
    out = []
    for b in fl.ParamLayout.from_model(model).blocks:
        rows, inp = b.module.out_features, b.module.in_features
        cols = inp + 1
        # public index of M[o, c]: W row-major, then the bias
        idx = torch.tensor(
            [o * inp + c if c < inp else rows * inp + o for o in range(rows) for c in range(cols)],
            device=F.device,
        )
        blk = F[b.start : b.stop, b.start : b.stop][idx][:, idx]
        out.append(
            blk.reshape(rows, cols, rows, cols)
            .permute(0, 2, 1, 3)
            .reshape(rows * rows, cols * cols)
        )
    return out


def test_kron_sum_rank_one_is_the_frobenius_optimal_kronecker_product(device) -> None:
    model, data = make("mlp", device=device)
    F_ref = reference("mlp", device)
    F = fl.fisher(model, data, structure="kron_sum", rank=1)
    errs = []
    got = rearranged_blocks(model, F.to_dense())
    for g, r in zip(got, rearranged_blocks(model, F_ref), strict=True):
        u, s, vh = torch.linalg.svd(r)
        best = s[0] * torch.outer(u[:, 0], vh[0])
        errs.append(torch.linalg.matrix_norm(g - best) / torch.linalg.matrix_norm(best))
    assert max(errs) < 1e-9


def test_kron_sum_error_is_non_increasing_in_r_and_zero_when_exact() -> None:
    model, data = make("mlp")
    F_ref = reference("mlp")
    mask = block_mask(model, F_ref.shape[0])
    target = torch.where(mask, F_ref, torch.zeros_like(F_ref))
    errs = [
        torch.linalg.matrix_norm(
            fl.fisher(model, data, structure="kron_sum", rank=r).to_dense() - target
        )
        for r in (1, 2, 3, 5)
    ]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < errs[0]
    # two examples through one linear layer: each block is exactly a sum of 2 Kronecker products
    torch.manual_seed(1)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(2, 4)
    exact = reference_fisher(lin, x)
    F2 = fl.fisher(lin, (x, torch.zeros(2, dtype=torch.long)), structure="kron_sum", rank=2)
    assert close(F2.to_dense(), exact)
    F1 = fl.fisher(lin, (x[:1], torch.zeros(1, dtype=torch.long)), structure="kron_sum", rank=1)
    assert close(F1.to_dense(), reference_fisher(lin, x[:1]))


@pytest.mark.parametrize("name", ["conv", "seq", "twice"])
def test_kron_sum_with_enough_terms_is_the_exact_block(name: str, device) -> None:
    model, data = make(name, device=device)
    F_ref = reference(name, device)
    target = torch.where(block_mask(model, F_ref.shape[0]), F_ref, torch.zeros_like(F_ref))
    big = max(b.numel for b in fl.ParamLayout.from_model(model).blocks)
    F = fl.fisher(model, data, structure="kron_sum", rank=big)
    assert close(F.to_dense(), target, rtol=1e-8)


# -- exact linear algebra of the new structures against their own dense form -------------------------
@functools.cache
def built(structure: str, rank: int | None = None):
    model, data = make("conv")
    return fl.fisher(model, data, structure=structure, rank=rank)


EIGEN = [("ekfac", None), ("lowrank", 6), ("kron_sum", 1)]
SOLVABLE = [*EIGEN, ("quasi_diag", None), ("kron_sum", 3)]


@pytest.mark.parametrize("structure,rank", SOLVABLE)
@pytest.mark.parametrize("damping", [0.05, 0.5])
def test_solve_and_products_match_the_dense_form(
    structure: str, rank: int | None, damping: float
) -> None:
    F = built(structure, rank)
    D = F.to_dense()
    p = D.shape[0]
    Fd = F.add_diagonal(torch.tensor(damping))
    assert type(Fd) is type(F)
    Dd = D + damping * torch.eye(p)
    assert close(Fd.to_dense(), Dd)
    b = torch.randn(p, 2)
    assert close(Fd @ b, Dd @ b)
    assert close(Fd.solve(b), torch.linalg.solve(Dd, b), rtol=1e-9)
    assert close(Fd.solve(b[:, 0]), torch.linalg.solve(Dd, b[:, 0]), rtol=1e-9)
    assert close(F.diagonal(), D.diagonal())
    assert close(fl.trace(Fd), Dd.trace())
    assert close(fl.frobenius_norm(Fd), torch.linalg.matrix_norm(Dd))
    assert close((2.0 * F).to_dense(), 2 * D)


@pytest.mark.parametrize("structure,rank", EIGEN)
@pytest.mark.parametrize("damping", [0.05, 0.5])
def test_logdet_root_and_eigh_are_exact(structure: str, rank: int | None, damping: float) -> None:
    Fd = built(structure, rank).add_diagonal(torch.tensor(damping))
    Dd = Fd.to_dense()
    inv_quad, logdet = Fd.inv_quad_logdet(torch.randn(Dd.shape[0], 2), logdet=True)
    assert close(logdet, torch.logdet(Dd))
    root = Fd.root_decomposition().root.to_dense()
    assert close(root @ root.T, Dd)
    s = Fd.root_inv_decomposition().root.to_dense()
    assert close(s @ s.T, torch.linalg.inv(Dd), rtol=1e-9)
    evals, evecs = Fd.eigh()
    assert close(torch.sort(evals).values, torch.linalg.eigvalsh(Dd), rtol=1e-9)
    q = evecs.to_dense()
    assert close(q @ torch.diag(evals) @ q.T, Dd, rtol=1e-9)
    assert close(q.T @ q, torch.eye(q.shape[0]), rtol=1e-9)


def test_kron_sum_of_two_terms_without_damping_has_an_exact_logdet_and_root() -> None:
    torch.manual_seed(1)
    lin = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    x = torch.randn(6, 4)
    F = fl.fisher(lin, (x, torch.randn(6, 3)), likelihood="gaussian", structure="kron_sum", rank=2)
    assert F._forms()[0] is not None  # the simultaneous diagonalisation applies
    D = F.to_dense()
    b = torch.randn(D.shape[0])
    assert close(F.solve(b), torch.linalg.solve(D, b), rtol=1e-8)
    if torch.linalg.eigvalsh(D)[0] > 0:  # a truncated Kronecker sum need not be PSD
        assert close(F.logdet(), torch.logdet(D), rtol=1e-9)
        r = F.root_decomposition().root.to_dense()
        assert close(r @ r.T, D)


# -- per-layer mixes --------------------------------------------------------------------------------
def test_a_per_layer_mix_is_block_diagonal_with_each_layers_own_structure() -> None:
    model, data = make("normed")
    F_ref = reference("normed")
    mix = fl.fisher(
        model, data, structure={nn.Linear: "kfac", model[3]: "ekfac", "default": "block_diag"}
    )
    assert isinstance(mix, fl.operators.Mixed)
    kfac = fl.fisher(model, data, structure="kfac", params=[model[0]]).to_dense()
    ekfac = fl.fisher(model, data, structure="ekfac", params=[model[3]]).to_dense()
    blocks = fl.ParamLayout.from_model(model).blocks
    norm = F_ref[blocks[1].start : blocks[1].stop, blocks[1].start : blocks[1].stop]
    assert close(mix.to_dense(), torch.block_diag(kfac, norm, ekfac))
    # exact algebra group by group, damping included
    Fd = mix.add_diagonal(torch.tensor(0.1))
    D = Fd.to_dense()
    b = torch.randn(D.shape[0], 2)
    assert close(Fd.solve(b), torch.linalg.solve(D, b), rtol=1e-9)
    assert close(Fd.inv_quad_logdet(logdet=True)[1], torch.logdet(D))
    r = Fd.root_decomposition().root.to_dense()
    assert close(r @ r.T, D)
    evals, evecs = Fd.eigh()
    q = evecs.to_dense()
    assert close(q @ torch.diag(evals) @ q.T, D, rtol=1e-9)
    assert close(mix.diagonal(), torch.block_diag(kfac, norm, ekfac).diagonal())
    assert close(fl.frobenius_norm(Fd), torch.linalg.matrix_norm(D))


def test_a_mix_by_module_name_and_non_contiguous_groups() -> None:
    model, data = make("mlp")
    F_ref = reference("mlp")
    mix = fl.fisher(model, data, structure={"2": "dense", "default": "diag"})
    blocks = fl.ParamLayout.from_model(model).blocks
    expected = torch.diag(F_ref.diagonal())
    sl = slice(blocks[1].start, blocks[1].stop)
    expected[sl, sl] = F_ref[sl, sl]
    assert close(mix.to_dense(), expected)
    b = torch.randn(F_ref.shape[0])
    damped = expected + 0.1 * torch.eye(F_ref.shape[0])
    assert close(
        mix.add_diagonal(torch.tensor(0.1)).solve(b), torch.linalg.solve(damped, b), rtol=1e-9
    )


def test_a_mix_that_misses_a_layer_names_it() -> None:
    model, data = make("normed")
    with pytest.raises(ValueError, match="'1' \\(nn.LayerNorm\\)"):
        fl.fisher(model, data, structure={nn.Linear: "kfac"})


class _CountingBatches:
    """An iterable of batches that counts the passes over it."""

    def __init__(self, batches: list) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_a_one_pass_mix_equals_its_groups_built_alone_from_one_data_pass(kfac_approx: str) -> None:
    model = _bn_model()
    x, y = torch.randn(7, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    data = _CountingBatches([(x[:4], y[:4]), (x[4:], y[4:])])
    mapping = {"default": "kfac", nn.BatchNorm2d: "block_diag", "4": "diag"}
    mix = fl.fisher(model, data, structure=mapping, kfac_approx=kfac_approx)
    assert data.passes == 1
    assert mix.structures == ("kfac", "block_diag", "diag")
    alone = [
        fl.fisher(model, data, structure="kfac", params=[model[0]], kfac_approx=kfac_approx),
        fl.fisher(model, data, structure="block_diag", params=[model[1]]),
        fl.fisher(model, data, structure="diag", params=[model[4]]),
    ]
    assert close(mix.to_dense(), torch.block_diag(*[op.to_dense() for op in alone]))
    # the BatchNorm block against the brute-force float64 reference
    F_ref = reference_fisher(model, x)
    bn = fl.ParamLayout.from_model(model).blocks[1]
    sl = slice(bn.start, bn.stop)
    assert close(mix.to_dense()[sl, sl], F_ref[sl, sl])


def test_a_one_pass_mc_mix_shares_the_sampled_labels() -> None:
    model = _bn_model()
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    kw = {"fisher_type": "mc", "mc_samples": 2}
    mix = fl.fisher(
        model,
        (x, y),
        structure={"default": "diag", nn.Linear: "dense"},
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    union = fl.fisher(
        model, (x, y), structure="dense", generator=torch.Generator().manual_seed(3), **kw
    ).to_dense()
    lin = fl.ParamLayout.from_model(model).blocks[-1]
    sl = slice(lin.start, lin.stop)
    assert close(mix.to_dense()[sl, sl], union[sl, sl])  # the same samples as one engine pass
    assert close(mix.diagonal()[: lin.start], union.diagonal()[: lin.start])


def test_a_one_pass_mix_leaves_the_model_as_found_when_a_batch_raises() -> None:
    model = _bn_model()
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("nan")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="batch 1 contains NaN"):
        fl.fisher(
            model, [(x, y), (x_bad, y)], structure={"default": "kfac", nn.BatchNorm2d: "diag"}
        )
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
