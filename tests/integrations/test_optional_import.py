"""``import fim_linops`` never needs laplace-torch; the bridge says how to get it."""

from __future__ import annotations

import subprocess
import sys

import fim_linops


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_fim_linops_works_without_laplace_torch_and_does_not_import_it():
    code = (
        "import sys; sys.modules['laplace'] = None\n"  # None in sys.modules: the import fails
        "import fim_linops, fim_linops.integrations\n"
        "assert not any(m == 'laplace' or m.startswith('laplace.') for m in sys.modules "
        "if sys.modules[m] is not None)\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr


def test_the_bridge_without_laplace_torch_raises_an_import_error_that_says_what_to_install():
    code = (
        "import sys; sys.modules['laplace'] = None\n"
        "try:\n    import fim_linops.integrations.laplace_torch\n"
        "except ImportError as e:\n    print(e)\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "pip install" in res.stdout and "laplace-torch" in res.stdout


def test_the_public_api_does_not_export_the_integrations():
    assert "integrations" not in fim_linops.__all__
    assert "FimLinopsGGN" not in vars(fim_linops)
