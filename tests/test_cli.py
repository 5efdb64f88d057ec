"""The fim-linops demo runs end to end and writes its report."""

from __future__ import annotations

import json

from fim_linops.cli import main


def test_demo_writes_a_report_with_every_structure(tmp_path, capsys) -> None:
    assert main(["demo", "--seconds", "1", "--examples", "256", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["structure"] for r in rows] == ["implicit", "diag", "kfac"]
    traces = {r["structure"]: r["trace"] for r in rows}
    assert abs(traces["diag"] - traces["implicit"]) < 1e-3 * traces["implicit"]  # same exact trace
    assert rows[0]["rel_error"] == 0.0
    assert 0 < rows[2]["rel_error"] < 1.0  # KFAC approximates the exact Fisher
    assert all(len(r["top_eigenvalues"]) == 5 for r in rows)
    assert (tmp_path / "report.md").read_text().startswith("# fim_linops demo report")
    assert (tmp_path / "top_eigenvalues.png").stat().st_size > 1000
    assert "kfac" in capsys.readouterr().out
