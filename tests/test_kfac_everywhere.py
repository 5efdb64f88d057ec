"""structure="kfac" / "ekfac" / "kron_sum" on every model: Kronecker factors where a layer has
them, exact blocks (dense when small, else the diagonal) elsewhere, all checked against float64
references: every block is what ``describe()`` says, the Kronecker blocks equal those of the pure
structure on the same layers, the exact blocks equal the reference's blocks."""

from __future__ import annotations

import pickle

import models
import pytest
import torch
from reference import exact_fisher
from torch import Tensor, nn

import fim_linops as fl
from fim_linops.builders import everywhere
from fim_linops.layout import ParamLayout
from fim_linops.operators import Mixed

pytestmark = pytest.mark.usefixtures("float64_default")


# -- models ---------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, ReLU, mean pool, Linear head (BatchNorm in eval)."""

    def __init__(self, c: int = 3, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + x)
        return self.head(h.mean((2, 3)))


def resnet_block() -> models.Batch:
    torch.manual_seed(10)
    model = ResBlock()
    for bn in (model.bn1, model.bn2):
        models._perturb_affine(bn)
        with torch.no_grad():
            bn.running_mean.copy_(0.2 * torch.randn(3))
            bn.running_var.copy_(0.5 + torch.rand(3))
    model.eval()
    return model, torch.randn(5, 3, 4, 4), torch.randint(0, 3, (5,))


def groupnorm_cnn() -> models.Batch:
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    models._perturb_affine(model[1])
    return model, torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))


class TinyTransformer(nn.Module):
    """Embedding + learned positions, LayerNorm, nn.MultiheadAttention, an attention made of
    Linear layers, a LayerNorm'd MLP, mean pool, Linear head: tokens (N, T) -> logits (N, C)."""

    def __init__(self, vocab: int = 7, d: int = 4, t: int = 3, classes: int = 3):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(t, d))
        self.ln1 = nn.LayerNorm(d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tok(tokens) + self.pos
        z = self.ln1(h)
        h = h + self.mha(z, z, z, need_weights=True)[0]  # the math path (no fused kernel)
        z = self.ln2(h)
        att = torch.softmax(self.q(z) @ self.k(z).transpose(1, 2) / 2.0, dim=-1)
        h = h + att @ self.v(z)
        h = h + torch.tanh(self.mlp(h))
        return self.head(h.mean(1))


def transformer() -> models.Batch:
    torch.manual_seed(12)
    model = TinyTransformer()
    models._perturb_affine(model.ln1)
    models._perturb_affine(model.ln2)
    return model, torch.randint(0, 7, (5, 3)), torch.randint(0, 3, (5,))


MODELS = {
    "resnet_block": resnet_block,
    "groupnorm_cnn": groupnorm_cnn,
    "transformer": transformer,
    "raw_param": models.raw_param_model,
    "norm_mlp": models.norm_model,
}


# -- checks ---------------------------------------------------------------------------------------
def _build(model, x, y, structure: str, **kw) -> Mixed:
    F = fl.fisher(model, (x, y), structure=structure, rank=1, **kw)
    assert isinstance(F, Mixed)
    return F


def _check_blocks(model: nn.Module, x, y, structure: str, F: Mixed) -> None:
    """Every layer's block is what describe() says, against the float64 references."""
    layout = ParamLayout.from_model(model)
    blocks = {b.module_name or "<model>": b for b in layout.blocks}
    assert [info.name for info in F.layers] == list(blocks)
    dense = F.to_dense()
    ref = exact_fisher(model, x, "categorical")
    want = torch.zeros_like(dense)
    kron = [info.name for info in F.layers if info.structure == structure]
    for info in F.layers:
        b = blocks[info.name]
        assert info.numel == b.numel and info.kind == type(b.module).__name__
        sl = slice(b.start, b.stop)
        if info.structure == "block_diag":
            assert info.reason and b.numel <= everywhere.EXACT_DENSE_MAX
            want[sl, sl] = ref[sl, sl]
        elif info.structure == "diag":
            assert info.reason
            want[sl, sl] = torch.diag(ref[sl, sl].diagonal())
        else:
            assert info.structure == structure and not info.reason
    if kron:  # the Kronecker blocks: those of the pure structure on the same layers
        pure = fl.fisher(
            model, (x, y), structure=structure, rank=1, params=[blocks[n].module for n in kron]
        )
        idx = torch.cat([torch.arange(blocks[n].start, blocks[n].stop) for n in kron])
        want[idx[:, None], idx[None, :]] = pure.to_dense()
    torch.testing.assert_close(dense, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("structure", ["kfac", "ekfac", "kron_sum"])
def test_every_block_is_what_describe_says(name: str, structure: str) -> None:
    model, x, y = MODELS[name]()
    with _no_warning_filter():
        F = _build(model, x, y, structure)
    _check_blocks(model, x, y, structure, F)
    assert repr(F) == F.describe()
    text = F.describe()
    for info in F.layers:
        assert info.name in text and info.structure in text


class _no_warning_filter:
    """kron_sum on tiny blocks may warn that it stopped at the precision floor: not the subject."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_transformer_layers_are_described_with_their_reasons() -> None:
    model, x, y = transformer()
    F = _build(model, x, y, "kfac")
    by = {i.name: i for i in F.layers}
    assert by["tok"].structure == "kfac"  # Embedding: Kronecker
    assert by["q"].structure == by["head"].structure == "kfac"
    assert by["ln1"].structure == "block_diag" and "no Kronecker factorisation" in by["ln1"].reason
    assert by["<model>"].structure == "block_diag" and by["<model>"].reason == "no Kronecker rule"
    # MultiheadAttention: in_proj (three Kronecker blocks, q, k, v) and out_proj (nn.Linear's
    # rule) through the module's capture forward (engine/rules/mha.py)
    assert by["mha"].structure == "kfac" and by["mha.out_proj"].structure == "kfac"


@pytest.mark.parametrize("structure", ["diag", "block_diag", "dense"])
def test_multihead_attention_blocks_are_exact_through_their_rules_without_a_warning(
    structure,
) -> None:
    import warnings

    model, x, y = transformer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no demotion warning, no restart of the build
        F = fl.fisher(model, (x, y), structure=structure)
    ref = exact_fisher(model, x, "categorical")
    blocks = {b.module_name: b for b in ParamLayout.from_model(model).blocks}
    for name in ("mha", "mha.out_proj"):
        sl = slice(blocks[name].start, blocks[name].stop)
        got = F.to_dense()[sl, sl]
        want = ref[sl, sl] if structure != "diag" else torch.diag(ref[sl, sl].diagonal())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_large_layers_without_factors_get_their_exact_diagonal(monkeypatch) -> None:
    monkeypatch.setattr(everywhere, "EXACT_DENSE_MAX", 10)
    model, x, y = models.norm_model()  # GroupNorm 16 and BatchNorm 12 parameters: > 10
    F = _build(model, x, y, "kfac")
    assert [i.structure for i in F.layers] == ["kfac", "diag", "kfac", "diag", "kfac"]
    _check_blocks(model, x, y, "kfac", F)


def test_frozen_parameters_are_left_out() -> None:
    model, x, y = models.norm_model()
    model[1].weight.requires_grad_(False)
    model[3].requires_grad_(False)
    F = _build(model, x, y, "kfac")
    assert [(i.name, i.numel) for i in F.layers] == [("0", 48), ("1", 8), ("4", 12), ("6", 28)]
    _check_blocks(model, x, y, "kfac", F)


def test_algebra_is_exact_on_the_result() -> None:
    model, x, y = groupnorm_cnn()
    F = _build(model, x, y, "kfac")
    dense = F.to_dense()
    p = dense.shape[0]
    d = dense + 0.1 * torch.eye(p)
    Fd = F.add_diagonal(torch.tensor(0.1))
    b = torch.randn(p)
    torch.testing.assert_close(Fd.solve(b), torch.linalg.solve(d, b))
    _, logdet = Fd.inv_quad_logdet(logdet=True)
    torch.testing.assert_close(logdet, torch.logdet(d))
    root = Fd.root_decomposition().root.to_dense()
    torch.testing.assert_close(root @ root.T, d)
    evals, evecs = Fd.eigh()
    torch.testing.assert_close(evecs.to_dense() @ torch.diag(evals) @ evecs.to_dense().T, d)
    half = fl.power(Fd, 0.5).to_dense()
    torch.testing.assert_close(half @ half, d)
    samples = fl.sample(F, 4000, damping=0.1, generator=torch.Generator().manual_seed(0))
    cov = samples.T @ samples / samples.shape[0]
    assert (cov - torch.linalg.inv(d)).abs().max() < 0.15 * torch.linalg.inv(d).abs().max()
    again = pickle.loads(pickle.dumps(F))
    torch.testing.assert_close(again.to_dense(), dense)
    assert again.describe() == F.describe()


def test_laplace_on_a_model_with_norm_layers() -> None:
    model, x, y = models.norm_model()
    la = fl.laplace.Laplace(model, (x, y), "categorical", structure="kfac", prior_precision=1.0)
    dense = la.posterior_precision.to_dense()
    F = _build(model, x, y, "kfac")
    torch.testing.assert_close(dense, F.to_dense() * x.shape[0] + torch.eye(dense.shape[0]))
    lml = la.log_marginal_likelihood()
    assert torch.isfinite(lml)
    mean, cov = la.predictive(x)
    assert mean.shape == (8, 4) and cov.shape == (8, 4, 4)


def test_mc_labels_are_shared_between_the_groups() -> None:
    model, x, y = models.norm_model()
    kw = dict(fisher_type="mc", mc_samples=2)
    F = _build(model, x, y, "kfac", generator=torch.Generator().manual_seed(3), **kw)
    mix = fl.fisher(
        model,
        (x, y),
        structure={nn.GroupNorm: "block_diag", nn.BatchNorm1d: "block_diag", "default": "kfac"},
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    torch.testing.assert_close(F.to_dense(), mix.to_dense(), rtol=1e-12, atol=1e-14)


def test_ekfac_takes_two_passes_and_kfac_one() -> None:
    model, x, y = models.norm_model()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        for structure, passes in (("kfac", 1), ("ekfac", 2)):
            calls.clear()
            _build(model, x, y, structure)
            # the first batch's checks add one forward of one example
            assert len(calls) == passes + 1, structure
    finally:
        handle.remove()


def test_strict_restores_the_error_and_names_the_layers() -> None:
    model, x, y = groupnorm_cnn()
    with pytest.raises(
        ValueError, match="'1' \\(nn.GroupNorm: no Kronecker factorisation\\)"
    ) as err:
        fl.fisher(model, (x, y), structure="kfac", strict=True)
    assert "{nn.GroupNorm: 'block_diag', 'default': 'kfac'}" in str(err.value)
    assert "restrict params" not in str(err.value)
    F = fl.fisher(model, (x, y), structure={nn.GroupNorm: "block_diag", "default": "kfac"})
    torch.testing.assert_close(F.to_dense(), _build(model, x, y, "kfac").to_dense())
    model, x, y = models.raw_param_model()
    with pytest.raises(
        ValueError, match="ekfac.*'<model>' \\(models.RawParamModel.*'affine' \\(models.Affine"
    ):
        fl.fisher(model, (x, y), structure="ekfac", strict=True)


def test_strict_error_on_a_demoted_embedding_names_it() -> None:
    class Shifted(nn.Module):  # positions added by a direct use of the Embedding's weight
        def __init__(self):
            super().__init__()
            self.wpe = nn.Embedding(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head((x + self.wpe.weight).mean(1))

    torch.manual_seed(0)
    model, x, y = Shifted(), torch.randn(4, 3, 4), torch.randint(0, 2, (4,))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="'wpe' \\(nn.Embedding: its parameters") as err:
            fl.fisher(model, (x, y), structure="kfac", params=[model.wpe], strict=True)
        F = fl.fisher(model, (x, y), structure="kfac", params=[model.wpe])
    msg = str(err.value)
    assert "{'wpe': 'block_diag', 'default': 'kfac'}" in msg and "params=" not in msg
    ref = exact_fisher(model, x, "categorical", params=[model.wpe])
    torch.testing.assert_close(F.to_dense(), ref)  # one block of 12 parameters: dense, exact


def test_pure_kronecker_operators_describe_their_layers() -> None:
    model, x, y = models.mlp()
    F = fl.fisher(model, (x, y), structure="kfac")
    text = F.describe()
    for b in ParamLayout.from_model(model).blocks:
        assert f"{b.module_name}" in text and str(b.numel) in text
    assert text.count("kfac") == len(ParamLayout.from_model(model).blocks)


@pytest.mark.parametrize("kron", ["kfac", "ekfac"])
def test_a_kronecker_group_of_a_mix_gives_exact_blocks_to_its_layers_without_factors(
    kron: str,
) -> None:
    model, x, y = models.norm_model()  # Linear, GroupNorm, Linear, BatchNorm1d, Linear
    mix = {nn.Linear: kron, nn.BatchNorm1d: "diag", "default": kron}  # GroupNorm in the kron group
    F = fl.fisher(model, (x, y), structure=mix)
    assert isinstance(F, Mixed)
    got = [(i.name, i.structure, i.reason) for i in F.layers]
    assert got == [
        ("0", kron, ""),
        ("1", "block_diag", "no Kronecker factorisation"),
        ("3", kron, ""),
        ("4", "diag", ""),
        ("6", kron, ""),
    ]
    assert sorted(F.structures) == sorted([kron, "block_diag", "diag"])
    layout = ParamLayout.from_model(model)
    blocks = {b.module_name: b for b in layout.blocks}
    ref = exact_fisher(model, x, "categorical")
    want = torch.zeros_like(ref)
    lin = [blocks[n] for n in ("0", "3", "6")]
    pure = fl.fisher(model, (x, y), structure=kron, params=[b.module for b in lin]).to_dense()
    idx = torch.cat([torch.arange(b.start, b.stop) for b in lin])
    want[idx[:, None], idx[None, :]] = pure
    gn, bn = blocks["1"], blocks["4"]
    want[gn.start : gn.stop, gn.start : gn.stop] = ref[gn.start : gn.stop, gn.start : gn.stop]
    bdiag = ref.diagonal()[bn.start : bn.stop]
    want[bn.start : bn.stop, bn.start : bn.stop] = torch.diag(bdiag)
    torch.testing.assert_close(F.to_dense(), want, rtol=1e-9, atol=1e-12)
    # the plain structure on the same layers: the same operator
    plain = fl.fisher(model, (x, y), structure={nn.BatchNorm1d: "diag", "default": kron})
    torch.testing.assert_close(plain.to_dense(), F.to_dense(), rtol=1e-12, atol=1e-14)
    text = F.describe()
    assert "GroupNorm" in text and "no Kronecker factorisation" in text


@pytest.mark.parametrize("kron", ["kfac", "ekfac"])
def test_strict_keeps_a_mixs_kronecker_group_pure(kron: str) -> None:
    model, x, y = models.norm_model()
    mix = {nn.Linear: kron, nn.BatchNorm1d: "diag", "default": kron}
    with pytest.raises(ValueError, match="'1' \\(nn.GroupNorm: no Kronecker factorisation\\)"):
        fl.fisher(model, (x, y), structure=mix, strict=True)


def test_a_mix_describes_its_layers() -> None:
    model, x, y = models.norm_model()
    F = fl.fisher(model, (x, y), structure={nn.Linear: "kfac", "default": "diag"})
    assert [(i.name, i.structure) for i in F.layers] == [
        ("0", "kfac"),
        ("1", "diag"),
        ("3", "kfac"),
        ("4", "diag"),
        ("6", "kfac"),
    ]
    assert repr(F) == F.describe()


def _dist_setup():
    """The model made in float64 directly: its initial values do not depend on the default dtype
    (the test process runs under float64_default, the workers do not)."""
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, **f64),
        nn.GroupNorm(1, 3, **f64),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 4, **f64),
    )
    models._perturb_affine(model[1])
    return model, torch.randn(12, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (12,))


def _dist_results(model, batches, v) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    with _no_warning_filter():
        for s in ("kfac", "ekfac", "kron_sum"):
            F = fl.fisher(model, batches, structure=s, rank=1)
            assert isinstance(F, Mixed)
            out[s] = (F @ v, F.diagonal())
        mix = {nn.GroupNorm: "diag", nn.Linear: "kfac", "default": "ekfac"}
        F = fl.fisher(model, batches, structure=mix)
        out["mix"] = (F @ v, F.diagonal())
    return out


def _dist_worker(rank: int, world: int) -> dict[str, tuple[Tensor, Tensor]]:
    model, x, y = _dist_setup()
    # uneven shards: rank 0 reads 5 examples in 2 batches, rank 1 reads 7 in one
    shard = [(x[:3], y[:3]), (x[3:5], y[3:5])] if rank == 0 else [(x[5:], y[5:])]
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    return _dist_results(model, shard, v)


def test_two_processes_with_half_the_data_each_equal_one_process_on_all() -> None:
    from multiproc import run_in_processes

    got = run_in_processes(_dist_worker, world_size=2)
    model, x, y = _dist_setup()
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    want = _dist_results(model, [(x, y)], v)
    for rank in range(2):  # every rank holds the reduced operator
        for s in want:
            for a, b in zip(got[rank][s], want[s], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=f"{rank} {s}")
