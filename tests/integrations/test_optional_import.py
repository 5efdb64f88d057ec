"""``import fim_linops`` never needs laplace-torch; the bridge says how to get it."""

from __future__ import annotations

import subprocess
import sys

import fim_linops

# None in sys.modules makes `import laplace` fail, as if laplace-torch were not installed
_WITHOUT_LAPLACE = """
import sys
sys.modules["laplace"] = None
import fim_linops, fim_linops.integrations
loaded = [m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] == "laplace"]
assert not loaded, loaded
try:
    import fim_linops.integrations.laplace_torch
except ImportError as err:
    print(err)
else:
    raise AssertionError("the bridge imported without laplace-torch")
"""


def test_fim_linops_imports_without_laplace_torch_and_the_bridge_says_what_to_install():
    res = subprocess.run(
        [sys.executable, "-c", _WITHOUT_LAPLACE], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "pip install" in res.stdout and "laplace-torch" in res.stdout


def test_the_public_api_does_not_export_the_integrations():
    assert "integrations" not in fim_linops.__all__
    assert "FimLinopsGGN" not in vars(fim_linops)
