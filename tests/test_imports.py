"""The package's import graph has no cycles, so each floor only looks down; the sum of two
operators works however the package was entered (its rule is registered by the operators package).

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` of a
``fim_linops`` module, at module level, inside functions and under ``TYPE_CHECKING`` alike;
relative imports are resolved against the importing module's package, and ``from pkg import name``
counts as an import of the submodule ``pkg.name`` where there is one (else of ``pkg``). Importing
a submodule also runs its parents' ``__init__``; those implicit edges are not counted (the
package's ``__init__`` imports the public API, so every module would sit in a cycle with it):
what counts is what a module's own code names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import fim_linops

PACKAGE = Path(fim_linops.__file__).parent
REPO = PACKAGE.parent

#: importer -> imported -> the line of the first import statement that names it
Graph = dict[str, dict[str, int]]


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under ``package`` (a package's
    ``__init__.py`` is the package itself)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (``import a.b.c`` imports
    ``a.b.c``; ``a.b.Class`` is a name in ``a.b``); None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, modules: dict[str, Path]) -> dict[str, int]:
    """The package's modules that module ``name`` imports anywhere in its source -> line."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target is not None and target != name:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_known(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..a import x, relative to this package
                parts = package.split(".")
                kept = parts[: len(parts) - node.level + 1]
                base = ".".join(kept + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else _known(base, modules), node.lineno)
    return found


def import_graph(package: Path) -> tuple[Graph, dict[str, Path]]:
    modules = module_files(package)
    return {m: imports_of(m, modules) for m in modules}, modules


def strongly_connected(graph: Graph) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan), each
    sorted, in a deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def shortest_cycle(graph: Graph, component: list[str]) -> list[str]:
    """A shortest import cycle through the component's first module (breadth-first within the
    component): [m0, m1, ..., m0]."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{component} is not a cycle")


def describe(
    graph: Graph, modules: dict[str, Path], components: list[list[str]], root: Path
) -> str:
    """One paragraph per cycle: its modules, then one closed path with the importing lines
    (files relative to ``root``, the folder that holds the package)."""
    lines = [f"{len(components)} import cycle(s) in the package:"]
    for comp in components:
        lines.append(f"- {len(comp)} modules: {', '.join(comp)}")
        path = shortest_cycle(graph, comp)
        for a, b in zip(path, path[1:], strict=False):
            where = f"{modules[a].relative_to(root)}:{graph[a][b]}"
            lines.append(f"    {a} imports {b} ({where})")
    lines.append(
        "A module may only import modules below it: pass what it needs in (a Protocol, a "
        "callable), register it (a registry filled by the lower floor's package), or move the "
        "shared part to a module both import."
    )
    return "\n".join(lines)


def test_the_package_has_no_import_cycles() -> None:
    graph, modules = import_graph(PACKAGE)
    assert len(modules) > 50 and "fim_linops.engine.engine" in modules  # the walk saw the package
    assert graph["fim_linops.engine.engine"].keys() >= {"fim_linops.engine.checks"}
    cycles = strongly_connected(graph)
    assert not cycles, describe(graph, modules, cycles, REPO)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


def test_the_walk_finds_cycles_through_functions_relative_imports_and_type_checking(
    tmp_path: Path,
) -> None:
    # pkg.a -> pkg.sub.b inside a function; pkg.sub.b -> pkg.a by a relative import under
    # TYPE_CHECKING; pkg.sub (the package) -> pkg.c through `from pkg import c` (a submodule);
    # pkg.c -> pkg.d.Name (a name in a module) and pkg.d -> pkg.c: a second cycle; pkg.e is free
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a, e\n",
            "pkg/a.py": "def f():\n    from pkg.sub.b import g\n    return g\n",
            "pkg/sub/__init__.py": "from pkg import c\n",
            "pkg/sub/b.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n"
                "def g(): ...\n"
            ),
            "pkg/c.py": "import pkg.d.Name\n",
            "pkg/d.py": "from . import c\nName = 1\n",
            "pkg/e.py": "from pkg.a import f\nimport os\n",
        },
    )
    graph, modules = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b": 2}
    assert graph["pkg.sub.b"] == {"pkg.a": 3}
    assert graph["pkg.sub"] == {"pkg.c": 1}
    assert graph["pkg.c"] == {"pkg.d": 1} and graph["pkg.d"] == {"pkg.c": 1}
    assert graph["pkg.e"] == {"pkg.a": 1}
    cycles = strongly_connected(graph)
    assert cycles == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]
    message = describe(graph, modules, cycles, tmp_path)
    assert "pkg.a imports pkg.sub.b (pkg/a.py:2)" in message
    assert "pkg.sub.b imports pkg.a (pkg/sub/b.py:3)" in message
    assert "pkg.c imports pkg.d (pkg/c.py:1)" in message
    assert "pkg.e" not in message


def _run(code: str) -> str:
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


_FISHER_ONLY = """
import torch
from torch import nn
from fim_linops.fisher import fisher

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
F1 = fisher(model, (x[:4], y[:4]), structure="kfac")
F2 = fisher(model, (x[4:], y[4:]), structure="kfac")
S = F1 + F2
assert type(S).__name__ == "KronSum", type(S)
torch.testing.assert_close(S.to_dense(), F1.to_dense() + F2.to_dense())
print(type(S).__name__)
"""


def test_adding_two_operators_works_after_importing_only_fim_linops_fisher() -> None:
    assert _run(_FISHER_ONLY).split() == ["KronSum"]


# the operators package entered without fim_linops/__init__.py (a bare namespace for the parent):
# its own import registers the rule of F1 + F2; algebra and fisher are never imported
_OPERATORS_ONLY = f"""
import sys, types
import torch
parent = types.ModuleType("fim_linops")
parent.__path__ = [{str(PACKAGE)!r}]
sys.modules["fim_linops"] = parent
from fim_linops.operators import Dense, Diag

d1, d2 = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 5.0], dtype=torch.float64)
S = Diag(d1) + Diag(d2, damping=torch.tensor(0.5, dtype=torch.float64))
assert type(S) is Diag, type(S)
torch.testing.assert_close(S.to_dense(), torch.diag(d1 + d2 + 0.5))
T = Dense(torch.diag(d1)) + Diag(d2)
assert type(T).__name__ == "Sum", type(T)
torch.testing.assert_close(T.to_dense(), torch.diag(d1 + d2))
loaded = sorted(m for m in ("fim_linops.algebra", "fim_linops.fisher") if m in sys.modules)
assert not loaded, loaded
print(type(S).__name__, type(T).__name__)
"""


def test_the_operators_package_registers_the_sum_without_algebra_or_fisher() -> None:
    assert _run(_OPERATORS_ONLY).split() == ["Diag", "Sum"]
