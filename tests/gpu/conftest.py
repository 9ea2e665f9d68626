"""The GPU suite: every test here carries the `gpu` marker, which the default run deselects
(pyproject addopts `-m "not gpu"`). Selected (`pytest -m gpu tests/gpu`, `make test-gpu`) on a machine
without CUDA, each test FAILS with one clear message; none skips, so a CPU-only run can never pass for a GPU run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
NO_CUDA = (
    "tests/gpu needs a CUDA GPU and torch's CUDA build (torch.cuda.is_available() is False here): "
    "run `make test-gpu` on a GPU machine; the CPU suite is `make test`"
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Mark every test under tests/gpu, so a new file cannot forget the marker (runs before -m deselects)."""
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    """Fail (not skip, not error in setup) each selected GPU test when there is no CUDA device."""
    if not torch.cuda.is_available():
        pytest.fail(NO_CUDA, pytrace=False)
