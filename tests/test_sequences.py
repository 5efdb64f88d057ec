"""Per-position likelihoods against float64 per-position references (tests/seq_models.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from seq_models import HFStyle, SeqRegressor, TinyGPT, gpt_and_batch, sequence_fisher

import fim_linops as fl

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


@pytest.mark.parametrize("structure", ["dense", "block_diag", "diag", "implicit"])
def test_causal_transformer_with_ignored_labels_matches_the_reference(structure: str) -> None:
    model, ids, labels = gpt_and_batch()
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    F = fl.fisher(model, (ids, labels), likelihood=fl.Categorical(), structure=structure)
    if structure == "diag":
        torch.testing.assert_close(F.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)
    elif structure == "block_diag":
        torch.testing.assert_close(F.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_positions_mean_divides_by_the_kept_positions() -> None:
    model, ids, labels = gpt_and_batch()
    ref = sequence_fisher(model, ids, "categorical", labels != -100, mean=True)
    lik = fl.Categorical(positions="mean")
    F = fl.fisher(model, [(ids[:2], labels[:2]), (ids[2:], labels[2:])], lik, structure="dense")
    torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_shift_labels_scores_position_t_against_label_t_plus_1() -> None:
    model, ids, labels = gpt_and_batch()
    ref = sequence_fisher(model, ids, "categorical", labels[:, 1:] != -100, shift=True)
    lik = fl.Categorical(shift_labels=True)
    F = fl.fisher(model, (ids, labels), lik, structure="dense")
    torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_mapping_batches_and_model_output_logits() -> None:
    model, ids, labels = gpt_and_batch()
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    hf = HFStyle(model)
    batch = {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}
    F = fl.fisher(hf, [batch], structure="dense")
    torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)
    no_labels = {"input_ids": ids, "attention_mask": (labels != -100).long()}
    F = fl.fisher(hf, no_labels, structure="diag")  # one mapping batch; the mask from attention
    torch.testing.assert_close(F.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="empirical.*labels"):
        fl.fisher(hf, [no_labels], structure="diag", fisher_type="empirical")


def test_chunked_exact_columns_match_and_warn_with_the_number_of_passes() -> None:
    model, ids, labels = gpt_and_batch()
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    with pytest.warns(RuntimeWarning, match="backward passes.*fisher_type='mc'"):
        F = fl.fisher(model, (ids, labels), structure="diag", max_bytes=20_000)
    torch.testing.assert_close(F.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-12)


def test_mc_fisher_of_sequences_converges_to_the_exact_one() -> None:
    model, ids, labels = gpt_and_batch()
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    gen = torch.Generator().manual_seed(0)
    F = fl.fisher(
        model, (ids, labels), structure="diag", fisher_type="mc", mc_samples=3000, generator=gen
    )
    err = (F.diagonal() - ref.diagonal()).norm() / ref.diagonal().norm()
    assert err < 0.05


def test_kfac_on_the_linear_layers_of_a_transformer() -> None:
    """KFAC on LayerNorm/Embedding is issue 17: here params= restricts to the Linear layers."""
    model, ids, labels = gpt_and_batch()
    lin = [p for n, p in model.named_parameters() if n.startswith(("attn", "fc", "out"))]
    for s in ("kfac", "ekfac"):
        F = fl.fisher(model, (ids, labels), structure=s, params=lin)
        assert torch.isfinite(F.to_dense()).all() and F.shape[0] == sum(p.numel() for p in lin)
    mix = fl.fisher(model, (ids, labels), structure={"fc": "kfac", "default": "block_diag"})
    assert mix.shape[0] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("structure", ["dense", "kfac", "implicit"])
def test_gaussian_sequence_regressor_with_nan_targets(structure: str) -> None:
    torch.manual_seed(0)
    model = SeqRegressor()
    x, y = torch.randn(3, 4, 3), torch.randn(3, 4, 2)
    y[0, 2:] = float("nan")
    ref = sequence_fisher(model, x, "gaussian", ~y.isnan().any(-1))
    F = fl.fisher(model, (x, y), likelihood="gaussian", structure=structure)
    if structure == "kfac":  # one Linear applied per position after a position mix: KFAC only
        assert F.shape == ref.shape
    else:
        torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_bf16_model_is_used_as_it_is() -> None:
    model, ids, labels = gpt_and_batch()
    model.to(torch.bfloat16)
    ref = sequence_fisher(model, ids, "categorical", labels != -100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for s in ("diag", "implicit"):
        F = fl.fisher(model, (ids, labels), structure=s)
        assert F.dtype == torch.float32
        err = (F.diagonal().double() - ref.diagonal()).norm() / ref.diagonal().norm()
        assert err < 0.05
    # KFAC: the token ids reach the Embedding rule as integers (statistics in float32)
    m64 = TinyGPT()
    m64.load_state_dict({k: v.double() for k, v in before.items()})
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(0))
    want = fl.fisher(m64, (ids, labels), structure="kfac") @ v
    F = fl.fisher(model, (ids, labels), structure="kfac")
    assert F.dtype == torch.float32
    assert ((F @ v.float()).double() - want).norm() / want.norm() < 0.05
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert next(model.parameters()).dtype == torch.bfloat16


def test_model_state_is_left_as_found() -> None:
    model, ids, labels = gpt_and_batch()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fl.fisher(model, (ids, labels), structure="diag")
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
