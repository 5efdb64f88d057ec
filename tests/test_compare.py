"""fl.compare: exact and Hutchinson Frobenius errors, top-k overlaps, table, plot and CSV."""

from __future__ import annotations

import csv

import matplotlib
import pytest
import torch
from torch import nn

import fim_linops as fl
from fim_linops.compare import Comparison, compare, operator_bytes, subspace_overlap

matplotlib.use("Agg")


def _mlp(d_in: int = 8, hidden: int = 16, c: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, c)).double()


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)
    ).double()


def _data(shape: tuple[int, ...], c: int, n: int = 48, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, c, (n,), generator=g)


def _by_name(cmp: Comparison) -> dict[str, dict]:
    return {r["structure"]: r for r in cmp.rows}


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_dense_and_implicit_have_zero_error_and_full_overlap(which):
    model, data = (_mlp(), _data((8,), 4)) if which == "mlp" else (_cnn(), _data((1, 6, 6), 5))
    rows = _by_name(compare(model, data, ["dense", "implicit", "kfac"], top_k=3))
    for name in ("dense", "implicit"):
        assert rows[name]["rel_error"] < 1e-12
        assert rows[name]["overlap"] == pytest.approx(1.0, abs=1e-10)
        assert rows[name]["error_method"] == "dense"
    assert 0 < rows["kfac"]["rel_error"] < 1
    assert 0 <= rows["kfac"]["overlap"] <= 1 + 1e-12


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_errors_are_ordered_by_what_each_structure_can_represent(which):
    model, data = (_mlp(), _data((8,), 4)) if which == "mlp" else (_cnn(), _data((1, 6, 6), 5))
    structures = {"diag": "diag", "block_diag": "block_diag", "kfac": "kfac", "ekfac": "ekfac"}
    err = {k: r["rel_error"] for k, r in _by_name(compare(model, data, structures)).items()}
    tol = 1e-10
    assert err["ekfac"] <= err["kfac"] + tol
    # the layer blocks of F are the Frobenius-nearest block-diagonal matrix
    assert err["block_diag"] <= err["ekfac"] + tol
    assert err["block_diag"] <= err["diag"] + tol
    low = [compare(model, data, ["lowrank"], rank=k).rows[0]["rel_error"] for k in (2, 6, 20)]
    assert low[0] >= low[1] - tol >= low[2] - 2 * tol


def test_hutchinson_agrees_with_the_exact_errors_on_a_mid_size_model():
    model, data = _mlp(d_in=16, hidden=48, c=6), _data((16,), 6, n=64)
    structures = ["diag", "kfac", "ekfac", "lowrank"]
    exact = _by_name(compare(model, data, structures, method="dense", rank=10))
    hutch = _by_name(compare(model, data, structures, method="hutchinson", n_probes=200, rank=10))
    assert next(iter(hutch.values()))["error_method"] == "hutchinson"
    for name in structures:
        e, h = exact[name]["rel_error"], hutch[name]
        assert 0 < h["rel_error_se"] < 0.05 * h["rel_error"]
        assert abs(h["rel_error"] - e) <= max(4 * h["rel_error_se"], 0.02 * e), name
        # exact top-k from Lanczos on the implicit operator vs eigh of the dense F
        assert h["overlap"] == pytest.approx(exact[name]["overlap"], abs=1e-6), name


def test_overlap_is_one_for_equal_subspaces_and_zero_for_orthogonal_ones():
    q = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))[0]
    assert subspace_overlap(q[:, :2], q[:, [1, 0]]) == pytest.approx(1.0)
    assert subspace_overlap(q[:, :2], q[:, 2:]) == pytest.approx(0.0, abs=1e-12)


def test_stored_bytes_count_the_operator_tensors():
    model, data = _mlp(), _data((8,), 4)
    p = fl.ParamLayout.from_model(model).numel
    damping = 8  # the scalar damping, a float64 tensor
    assert operator_bytes(fl.fisher(model, data, structure="diag")) == p * 8 + damping
    assert operator_bytes(fl.fisher(model, data, structure="dense")) == p * p * 8 + damping


def test_table_plot_and_csv(tmp_path):
    model, data = _mlp(), _data((8,), 4)
    cmp = compare(model, data, {"KFAC": "kfac", "mix": {nn.Linear: "diag"}}, top_k=2)
    table = cmp.table()
    assert table.count("\n") == 3 and "| KFAC |" in table and "| mix |" in table
    ax = cmp.plot()
    assert isinstance(ax, matplotlib.axes.Axes)
    assert ax.get_xlabel() == "build time (s)" and ax.get_ylabel()
    assert sorted(t.get_text() for t in ax.texts) == ["KFAC", "mix"]
    path = tmp_path / "cmp.csv"
    cmp.to_csv(path)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["structure"] for r in rows] == ["KFAC", "mix"]
    assert float(rows[0]["rel_error"]) == pytest.approx(cmp.rows[0]["rel_error"])


def test_bad_arguments_are_refused():
    model, data = _mlp(), _data((8,), 4)
    with pytest.raises(ValueError, match="method"):
        compare(model, data, ["kfac"], method="svd")
    with pytest.raises(ValueError, match="no structures"):
        compare(model, data, [])
    with pytest.raises(ValueError, match="top_k"):
        compare(model, data, ["kfac"], top_k=10_000)
