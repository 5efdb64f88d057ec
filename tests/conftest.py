"""Shared pytest fixtures.

``--device`` (or the ``FIM_LINOPS_TEST_DEVICE`` environment variable; default ``cpu``) sets the
device of the tests that take the ``device`` fixture: they build their models and data there, so
``python -m pytest --device cuda -m device`` runs them with CUDA tensors (benchmarks/gpu_check.sh).
The tests that take the fixture carry the ``device`` marker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=os.environ.get("FIM_LINOPS_TEST_DEVICE", "cpu"),
        help="device of the tests that take the `device` fixture (cpu, cuda, cuda:1; default cpu "
        "or $FIM_LINOPS_TEST_DEVICE); select only those tests with `-m device`",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "device: the test takes the `device` fixture (runs on --device)"
    )
    name = config.getoption("--device")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"--device {name!r} is not a torch device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--device {name!r} asked for CUDA but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); run with --device cpu"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device the test builds its models and data on (``--device``; default cpu)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def float64_default() -> Iterator[None]:
    """float64 as the default dtype during the test (the files that compare against float64
    references use it for every test: ``pytestmark = pytest.mark.usefixtures(...)``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
