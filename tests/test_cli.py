"""The fim-linops command: help texts, and the demo report (sections, figures, finite numbers)."""

from __future__ import annotations

import json
import math
import re

import pytest

from fim_linops.cli import main
from fim_linops.report.section import all_finite


def test_help_documents_every_subcommand_and_option(capsys) -> None:
    with pytest.raises(SystemExit) as top:
        main(["--help"])
    assert top.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as sub:
        main(["demo", "--help"])
    assert sub.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--out",
        "--quick",
        "--seconds",
        "--examples",
        "--slq-steps",
        "--slq-probes",
        "--compare-probes",
        "--fishleg-steps",
        "--seed",
        "--progress",
    ):
        assert option in text, option
    assert "report.md" in text and "results.json" in text


def test_demo_rejects_bad_settings(tmp_path, capsys) -> None:
    assert main(["demo", "--quick", "--examples", "0", "--out", str(tmp_path)]) == 2
    assert "--examples must lie in" in capsys.readouterr().err


def test_all_finite_sees_nested_nan() -> None:
    assert all_finite({"a": [1.0, {"b": (2.0, "x")}]})
    assert not all_finite({"a": [1.0, {"b": (math.nan,)}]})


def test_quick_demo_writes_a_report_with_every_section(tmp_path, capsys) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# fim_linops demo report")
    for heading in (
        "## Fisher at each structure",
        "## Spectrum",
        "## Approximation comparison",
        "## FishLeg vs Adam",
    ):
        assert heading in report, heading
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert set(images) == {"top_eigenvalues.png", "spectrum.png", "comparison.png", "fishleg.png"}
    for name in images:
        assert (tmp_path / name).stat().st_size > 1000, name

    results = json.loads((tmp_path / "results.json").read_text())
    assert all_finite(results)
    rows = results["structures"]["rows"]
    assert [r["structure"] for r in rows] == ["implicit", "diag", "kfac"]
    traces = {r["structure"]: r["trace"] for r in rows}
    assert abs(traces["diag"] - traces["implicit"]) < 1e-3 * traces["implicit"]  # same exact trace
    assert rows[0]["rel_error"] == 0.0
    assert 0 < rows[2]["rel_error"] < 1.0  # KFAC approximates the exact Fisher
    assert all(len(r["top_eigenvalues"]) == 5 for r in rows)
    # the spectrum: both densities reach the top eigenvalue found by Lanczos, within 5%
    top = rows[0]["top_eigenvalues"][0]
    assert abs(results["spectrum"]["exact (implicit)"]["lambda_max"] - top) < 0.05 * top
    comparison = {r["structure"]: r for r in results["comparison"]["rows"]}
    assert set(comparison) == {"diag", "kfac", "ekfac"}
    assert comparison["kfac"]["rel_error"] < comparison["diag"]["rel_error"]
    assert all(0 <= r["overlap"] <= 1 for r in comparison.values())
    for name in ("FishLeg", "Adam"):
        loss = results["fishleg"][name]["loss"]
        assert loss[-1] < loss[0], name  # both optimisers make progress in 30 steps
    assert "kfac" in capsys.readouterr().out
