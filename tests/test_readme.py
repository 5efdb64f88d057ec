"""The README's examples run, top to bottom, in one namespace (each block builds on the first)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run() -> None:
    blocks = _blocks()
    assert len(blocks) >= 7
    namespace: dict = {}
    ran = 0
    for code in blocks:
        if "torchrun" in code:  # needs several processes: tests/test_distributed.py covers it
            continue
        if "import laplace" in code and importlib.util.find_spec("laplace") is None:
            continue
        exec(compile(code, str(README), "exec"), namespace)
        ran += 1
    assert ran >= 6
    assert namespace["la"].predictive(namespace["x"])[1].shape == (20, 10, 10)


@pytest.mark.parametrize("name", ["fisher", "ntk", "FishLeg", "natural_gradient", "Laplace"])
def test_readme_names_the_main_entry_points(name: str) -> None:
    assert name in README.read_text()
