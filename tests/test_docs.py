"""The documentation runs: every ```python block of ``docs/*.md`` is executed.

The blocks of one page run in order in one namespace (a page reads like one session, later blocks
use the names of earlier ones). Blocks that import a peer library (NNGeometry, curvlinops: the
"before" side of the migration page) run when that library is installed and are skipped otherwise;
every other block always runs.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
PEER_IMPORT = re.compile(r"^\s*(?:from|import)\s+(nngeometry|curvlinops)\b", re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fences of a markdown text, in order."""
    return FENCE.findall(text)


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_peers(block: str, installed: Callable[[str], bool] = is_installed) -> list[str]:
    """Peer libraries a block imports that are not installed."""
    return [m for m in PEER_IMPORT.findall(block) if not installed(m)]


def run_page(page: Path, installed: Callable[[str], bool] = is_installed) -> list[int]:
    """Run the python blocks of a page in order in one namespace; the indices of the blocks
    skipped for a missing peer library."""
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    skipped = []
    for i, block in enumerate(python_blocks(page.read_text())):
        if missing_peers(block, installed):
            skipped.append(i)
            continue
        code = compile(block, f"{page.name}[block {i}]", "exec")
        try:
            exec(code, namespace)
        except Exception as exc:  # name the block that failed
            raise AssertionError(f"{page.name}, python block {i} failed:\n{block}") from exc
    return skipped


PAGES = sorted(p for p in DOCS.glob("*.md") if python_blocks(p.read_text()))


def test_the_block_extractor_finds_fenced_python_only():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python title='t'\nb = 2\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = 2\n"]
    block = "import os\nfrom curvlinops import GGNLinearOperator\nimport nngeometry.metrics\n"
    assert missing_peers(block, installed=lambda m: False) == ["curvlinops", "nngeometry"]
    assert missing_peers(block, installed=lambda m: True) == []


def test_the_pages_with_code_are_found():
    names = {p.name for p in PAGES}
    assert {"index.md", "migration.md", "choosing.md", "structures.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_of_the_page_runs(page: Path, capsys):
    skipped = run_page(page)
    if skipped:
        with capsys.disabled():
            print(f"\n{page.name}: blocks {skipped} skipped (a peer library is missing)")


def test_our_side_of_the_migration_page_runs_without_the_peers():
    skipped = run_page(DOCS / "migration.md", installed=lambda m: False)
    assert len(skipped) == 4  # NNGeometry before/check, curvlinops before/check


def test_the_compare_table_lists_every_structure_of_the_generator():
    sys.path.insert(0, str(DOCS))
    try:
        from gen_compare import STRUCTURES
    finally:
        sys.path.remove(str(DOCS))
    table = (DOCS / "assets" / "compare.md").read_text()
    with open(DOCS / "assets" / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["structure"] for r in rows] == list(STRUCTURES)
    for label in STRUCTURES:
        assert f"| {label} |" in table
    assert (DOCS / "assets" / "compare.png").stat().st_size > 10_000
