"""Bad input gets a clear ValueError/TypeError that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fim_linops as fl


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    return model, x, y


def test_unknown_likelihood() -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'.*categorical"):
        fl.fisher(model, (x, y), likelihood="poisson")


def test_likelihood_of_wrong_type() -> None:
    model, x, y = _setup()
    with pytest.raises(TypeError, match="likelihood must be"):
        fl.fisher(model, (x, y), likelihood=3)


def test_unknown_structure() -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match="unknown structure 'kfca'"):
        fl.fisher(model, (x, y), structure="kfca")


def test_unknown_fisher_type() -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match="unknown fisher_type 'true'"):
        fl.fisher(model, (x, y), fisher_type="true")


def test_mc_samples_below_one() -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match="mc_samples"):
        fl.fisher(model, (x, y), fisher_type="mc", mc_samples=0)


def test_label_out_of_range_for_empirical() -> None:
    model, x, _ = _setup()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])
    with pytest.raises(ValueError, match="out of range"):
        fl.fisher(model, (x, y), fisher_type="empirical", structure="diag")


def test_float_labels_for_categorical() -> None:
    model, x, _ = _setup()
    with pytest.raises(ValueError, match="class indices"):
        fl.fisher(model, (x, torch.rand(8)), structure="diag")


def test_output_shape_that_does_not_fit_bernoulli() -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match="bernoulli likelihood expects one logit"):
        fl.fisher(model, (x, y.float().clamp(max=1)), likelihood="bernoulli", structure="diag")


def test_output_with_extra_dims_needs_labels_per_position() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)))
    with pytest.raises(ValueError, match=r"read as 2 positions of 3 classes .* shape \(N, \*T\)"):
        fl.fisher(model, (torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), structure="diag")


def test_gaussian_target_shape() -> None:
    model, x, _ = _setup()
    with pytest.raises(ValueError, match="gaussian likelihood expects targets"):
        fl.fisher(
            model,
            (x, torch.randn(8, 2)),
            likelihood="gaussian",
            fisher_type="empirical",
            structure="diag",
        )


def test_nan_in_inputs_names_the_batch() -> None:
    model, x, y = _setup()
    x2 = x.clone()
    x2[1, 2] = float("nan")
    with pytest.raises(ValueError, match="batch 1 contains NaN"):
        fl.fisher(model, [(x, y), (x2, y)], structure="diag")


def test_finite_inputs_whose_sum_overflows_are_accepted() -> None:
    # the NaN check sums first and looks entry by entry only when the sum is not finite
    model, x, y = _setup()
    x2 = x.clone()
    x2[:, 0] = 3e38  # finite, but the sum overflows float32
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0  # so that the model output stays finite
    F = fl.fisher(model, (x2, y), structure="diag")
    assert torch.isfinite(F.diagonal()[-18:]).all()  # the second layer's entries (the
    # first layer's squared gradients on input 0 overflow legitimately)
    x2[0, 1] = -float("inf")
    with pytest.raises(ValueError, match="batch 0 contains NaN or inf"):
        fl.fisher(model, (x2, y), structure="diag")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_categorical_labels_of_any_integer_dtype(dtype: torch.dtype) -> None:
    model, x, y = _setup()
    ref = fl.fisher(model, (x, y), structure="diag", fisher_type="empirical").diagonal()
    got = fl.fisher(model, (x, y.to(dtype)), structure="diag", fisher_type="empirical")
    assert torch.equal(got.diagonal(), ref)


def test_inf_in_outputs_names_the_batch() -> None:
    model, x, y = _setup()
    with torch.no_grad():
        model[2].bias[0] = float("inf")
    with pytest.raises(ValueError, match="model output of batch 0 contains NaN or inf"):
        fl.fisher(model, (x, y), structure="diag")


def test_empty_data() -> None:
    model, _, _ = _setup()
    with pytest.raises(ValueError, match="data is empty"):
        fl.fisher(model, [], structure="diag")


@pytest.mark.parametrize(
    "structure", ["ekfac", "kron_sum", {nn.Linear: "ekfac", "default": "diag"}]
)
def test_one_shot_iterator_with_a_structure_that_passes_twice(structure) -> None:
    """A generator is consumed by the first pass: the second pass says so (not just "empty")."""
    model, x, y = _setup()
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    with pytest.raises(ValueError, match="one-shot iterator.*list of batches or a DataLoader"):
        fl.fisher(model, (b for b in batches), structure=structure, rank=1)
    for structure_ok in ["kfac", "diag", "implicit", "lowrank"]:  # one pass, or batches kept
        F = fl.fisher(model, iter(batches), structure=structure_ok, rank=1)
        G = fl.fisher(model, batches, structure=structure_ok, rank=1)
        torch.testing.assert_close(F.to_dense(), G.to_dense())


def test_data_none() -> None:
    model, _, _ = _setup()
    with pytest.raises(ValueError, match="data is None"):
        fl.fisher(model, None, structure="diag")


def test_data_that_is_a_single_tensor() -> None:
    model, x, _ = _setup()
    with pytest.raises(TypeError, match="\\(x, y\\) batches"):
        fl.fisher(model, x, structure="diag")


def test_batches_that_are_not_pairs() -> None:
    model, x, y = _setup()
    with pytest.raises(TypeError, match="batch 0 is a tuple of length 3"):
        fl.fisher(model, [(x, y, y)], structure="diag")


def test_targets_of_wrong_length() -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match="targets have shape \\(7,\\)"):
        fl.fisher(model, [(x, y[:7])], structure="diag")


def test_model_without_trainable_parameters() -> None:
    model, x, y = _setup()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fl.fisher(model, (x, y), structure="diag")


def test_params_not_of_the_model() -> None:
    model, x, y = _setup()
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        fl.fisher(model, (x, y), structure="diag", params=[other.weight])
    with pytest.raises(ValueError, match="not part of the model"):
        fl.fisher(model, (x, y), structure="diag", params=[other])


def test_kfac_on_unsupported_layer_names_it_and_suggests() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(
        ValueError, match="factors for module '1' \\(nn.PReLU.*\\{nn.PReLU: 'block_diag', 'default'"
    ):
        fl.fisher(model, (x, y), structure="kfac", strict=True)


def test_batchnorm_in_training_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="model.eval\\(\\)"):
        fl.fisher(model, (x, y), structure="diag")


def test_batchnorm_with_batch_statistics_in_eval_or_frozen() -> None:
    """Batch statistics couple the examples whether or not the BatchNorm has trainable
    parameters: frozen or affine-free BatchNorm in training mode, and track_running_stats=False
    (batch statistics even in eval mode), are clear errors, not a Fisher of coupled examples."""
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    frozen = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    frozen[1].requires_grad_(False)
    with pytest.raises(ValueError, match="training mode"):
        fl.fisher(frozen, (x, y), structure="diag")
    plain = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="training mode"):
        fl.fisher(plain, (x, y), structure="diag")
    batch_stats = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)
    ).eval()
    with pytest.raises(ValueError, match="track_running_stats=False.*nn.LayerNorm"):
        fl.fisher(batch_stats, (x, y), structure="diag")


def test_half_precision_model_is_used_as_it_is_with_a_float32_operator() -> None:
    model, x, y = _setup()
    want = fl.fisher(model, (x, y), structure="diag").diagonal()
    model.to(torch.bfloat16)
    F = fl.fisher(model, (x.bfloat16(), y), structure="diag")
    assert F.dtype == torch.float32 and next(model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(F.diagonal(), want, rtol=0.05, atol=1e-3)


def test_dense_memory_guard() -> None:
    model, x, y = _setup()
    with pytest.raises(MemoryError, match="use structure='kfac'.*max_bytes"):
        fl.fisher(model, (x, y), structure="dense", max_bytes=1000)


def test_matmul_with_vector_of_wrong_length() -> None:
    model, x, y = _setup()
    F = fl.fisher(model, (x, y), structure="diag")
    with pytest.raises((ValueError, RuntimeError), match="size|shape|length"):
        F @ torch.randn(F.shape[-1] + 1)


def test_quad_with_vector_of_wrong_length() -> None:
    model, x, y = _setup()
    F = fl.fisher(model, (x, y), structure="kfac")
    with pytest.raises(ValueError, match="vector of length"):
        fl.quad(F, torch.randn(3))


def test_model_that_is_not_a_module() -> None:
    _, x, y = _setup()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fl.fisher(lambda t: t, (x, y), structure="diag")


def test_label_values_checked_only_where_used() -> None:
    """Out-of-range labels are an error for the empirical Fisher (which uses them), not for the
    exact and MC Fishers (which do not); a user likelihood with the two-argument check_target of
    earlier versions still works."""
    model, x, _ = _setup()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])  # 3 is out of range for 3 classes
    exact = fl.fisher(model, (x, y), fisher_type="exact", structure="diag").diagonal()
    assert torch.isfinite(exact).all()
    fl.fisher(model, (x, y), fisher_type="mc", structure="diag")

    class OldStyle(fl.Categorical):
        def check_target(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().check_target(f, y)

    with pytest.raises(ValueError, match="out of range"):
        fl.fisher(model, (x, y), OldStyle(), fisher_type="empirical", structure="diag")
    with pytest.raises(ValueError, match="out of range"):
        fl.fisher(model, (x, y), OldStyle(), fisher_type="exact", structure="diag")


@pytest.mark.parametrize("wrap", ["dict", "tuple"])
def test_model_output_that_is_not_a_tensor(wrap: str) -> None:
    """Outputs that are neither a tensor nor hold 'logits' (a dict of other keys, a tuple) get a
    TypeError that says how to wrap the model, from fisher, implicit products and the NTK (was an
    AttributeError on .ndim). Outputs with 'logits' work (tests/test_sequences.py)."""
    model, x, y = _setup()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor):
            f = self.net(x)
            return {"scores": f} if wrap == "dict" else (f, f.sum())

    hint = "\\['scores'\\]" if wrap == "dict" else "\\[0\\]"
    wrapped = Wrapped()
    with pytest.raises(TypeError, match=f"returned a {wrap}.*model\\(x\\){hint}"):
        fl.fisher(wrapped, (x, y), structure="diag")
    with pytest.raises(TypeError, match=f"returned a {wrap}"):
        fl.fisher(wrapped, (x, y), structure="implicit") @ torch.randn(
            sum(p.numel() for p in model.parameters())
        )
    with pytest.raises(TypeError, match=f"returned a {wrap}"):
        fl.ntk(wrapped, x).to_dense()


# -- errors that point the right way (issue 16, item 5) --------------------------------------------
def _wide_convs(n_layers: int, channels: int) -> nn.Module:
    return nn.Sequential(
        *[nn.Conv2d(channels, channels, 3, padding=1) for _ in range(n_layers)],
        nn.Flatten(),
    )


def test_dense_memory_error_on_an_11m_parameter_model_names_only_structures_that_fit() -> None:
    """P = 11.8M (five 512-channel 3x3 convolutions, ResNet-sized): dense needs 500 TiB and
    block_diag 100 TiB, so the error must not suggest block_diag; kfac, diag, implicit fit."""
    model = _wide_convs(5, 512)
    p = sum(q.numel() for q in model.parameters())
    assert p > 11_000_000
    x, y = torch.randn(1, 512, 2, 2), torch.zeros(1, 512 * 4)
    with pytest.raises(fl.MemoryLimitError) as info:
        fl.fisher(model, (x, y), likelihood="gaussian", structure="dense")
    msg = str(info.value)
    fix = msg.split("; ", 1)[1]
    assert "block_diag" not in fix
    for name in ("'kfac' (stores", "'diag' (stores", "'implicit'", "'lowrank' with rank <="):
        assert name in fix, msg
    with pytest.raises(fl.MemoryLimitError) as info:
        fl.fisher(model, (x, y), likelihood="gaussian", structure="block_diag")
    assert "'kfac' (stores" in str(info.value) and "'0', 2,359,808 parameters" in str(info.value)


def test_memory_error_names_nothing_that_would_fail_the_same_limit() -> None:
    model, x, y = _setup()  # P = 43: dense 7.2 KiB, block_diag 3.7 KiB, kfac 380 B, diag 172 B
    with pytest.raises(fl.MemoryLimitError) as info:
        fl.fisher(model, (x, y), structure="dense", max_bytes=300)
    fix = str(info.value).split("; ", 1)[1]
    assert "'diag' (stores 172 bytes)" in fix and "'implicit'" in fix
    assert "'kfac'" not in fix and "block_diag" not in fix and "'ekfac'" not in fix
    with pytest.raises(fl.MemoryLimitError, match="'block_diag' \\(stores 3.7 KiB\\), 'kfac'"):
        fl.fisher(model, (x, y), structure="dense", max_bytes=5000)


def test_modules_are_named_by_their_qualified_class(monkeypatch) -> None:
    """A subclass never reads as the torch class it derives from."""
    import sys
    import types

    from fim_linops.naming import class_name

    pkg, sub = types.ModuleType("mypkg.layers"), types.ModuleType("mypkg.layers.linear")

    class Linear(nn.Linear):
        pass

    Linear.__module__ = "mypkg.layers.linear"
    Linear.__qualname__ = "Linear"
    sub.Linear = Linear  # type: ignore[attr-defined]
    pkg.Linear = Linear  # type: ignore[attr-defined]  (re-exported, as timm.layers does)
    monkeypatch.setitem(sys.modules, "mypkg", types.ModuleType("mypkg"))
    monkeypatch.setitem(sys.modules, "mypkg.layers", pkg)
    monkeypatch.setitem(sys.modules, "mypkg.layers.linear", sub)
    assert class_name(Linear(2, 2)) == "mypkg.layers.Linear"
    assert class_name(nn.Linear(2, 2)) == "nn.Linear"
    assert class_name(nn.modules.batchnorm.BatchNorm1d) == "nn.BatchNorm1d"

    class BatchNorm1d(nn.BatchNorm1d):
        pass

    model = nn.Sequential(nn.Linear(4, 5), BatchNorm1d(5), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="module '1' \\([\\w.]*test_errors.BatchNorm1d\\)"):
        fl.fisher(model, (x, y), structure="diag")
    plain = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="module '1' \\(nn.BatchNorm1d\\)"):
        fl.fisher(plain, (x, y), structure="diag")
    with pytest.raises(ValueError, match="does not cover modules '1' \\(nn.Tanh|'0' \\(nn.Linear"):
        fl.fisher(
            nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
            (x, y),
            structure={"2": "diag"},
        )


def test_an_x_y_batch_of_different_sizes_names_both() -> None:
    model, _, _ = _setup()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="x has 16 examples .*y has 10"):
        fl.fisher(model, (x, y), structure="diag")
    with pytest.raises(ValueError, match="x\\['input'\\] of shape \\(16, 4\\).*y has 10"):
        fl.fisher(_Kw(model), ({"input": x}, y), structure="diag")
    with pytest.raises(ValueError, match="y is a 0-d tensor"):
        fl.fisher(model, (x, torch.tensor(1)), structure="diag")


class _Kw(nn.Module):
    """A model called with keyword arguments: model(**{"input": x})."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.net(input)


def test_a_dict_input_is_passed_as_keyword_arguments() -> None:
    model, x, y = _setup()
    got = fl.fisher(_Kw(model), ({"input": x}, y), structure="diag").diagonal()
    torch.testing.assert_close(got, fl.fisher(model, (x, y), structure="diag").diagonal())


@pytest.mark.parametrize("generator", [3, "0", torch.manual_seed])
def test_generator_that_is_not_a_torch_generator(generator) -> None:
    model, x, y = _setup()
    with pytest.raises(TypeError, match="generator must be a torch.Generator.*manual_seed"):
        fl.fisher(model, (x, y), fisher_type="mc", structure="diag", generator=generator)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_generator_on_another_device_type() -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match="generator is on cuda.*cpu"):
        fl.fisher(
            model, (x, y), fisher_type="mc", structure="diag", generator=torch.Generator("cuda")
        )


def _dropout_model(p: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Dropout(p), nn.Tanh(), nn.Linear(5, 3))


def test_active_dropout_warns_in_every_entry_point_and_names_the_modules() -> None:
    model = _dropout_model()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    expected = "module '1' \\(nn.Dropout, p=0.1\\) is in training mode.*model.eval\\(\\)"
    with pytest.warns(UserWarning, match="the Fisher is computed with dropout active: " + expected):
        fl.fisher(model, (x, y), structure="diag")
    with pytest.warns(UserWarning, match="the NTK .*" + expected):
        fl.ntk(model, x)
    with pytest.warns(UserWarning, match="the Jacobian .*" + expected):
        fl.jacobian(model, x)
    with pytest.warns(UserWarning, match="the Fisher .*" + expected):
        post = fl.laplace.Laplace(model, (x, y), structure="diag")
    with pytest.warns(UserWarning, match="the predictive .*" + expected):
        post.predictive(x[:2])
    assert model.training  # left as found


def test_no_dropout_warning_in_eval_mode_or_with_p_zero() -> None:
    import warnings

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for model in (_dropout_model().eval(), _dropout_model(p=0.0)):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*dropout active")
            fl.fisher(model, (x, y), structure="diag")
            fl.ntk(model, x).to_dense()


def test_a_nested_structure_mix_says_what_a_mix_looks_like() -> None:
    model, x, y = _setup()
    with pytest.raises(TypeError, match="cannot be nested: use one flat dict.*'default'"):
        fl.fisher(model, (x, y), structure={"0": {"weight": "diag"}, "default": "kfac"})


def test_the_one_example_at_a_time_warning_names_the_module_classes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.warns(RuntimeWarning, match="'1' \\(nn.PReLU\\) over the examples"):
        fl.fisher(model, (x, y), fisher_type="empirical", structure="diag")
