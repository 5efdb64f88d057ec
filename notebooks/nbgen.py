"""Shared by the notebook generators ``make_0X.py``: cells -> notebook, optionally executed.

Each generator lists its cells as ``("md" | "code", source)`` pairs and calls :func:`main`;
``python notebooks/make_0X.py --execute`` runs the notebook with nbclient in a temporary folder
(figures stay in the outputs only) and writes it with its outputs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook of markdown ("md") and code cells with a python3 kernelspec."""
    nb = new_notebook()
    nb.cells = [
        new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def main(cells: list[tuple[str, str]], path: Path) -> None:
    """Write the notebook to ``path``; executed first when ``--execute`` is on the command line."""
    nb = build(cells)
    if "--execute" in sys.argv:
        from nbclient import NotebookClient

        with tempfile.TemporaryDirectory() as tmp:
            NotebookClient(
                nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp}}
            ).execute()
    nbformat.write(nb, path)
