"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before any kernel is JIT-wrapped; the kernel modules wrap
lazily at first launch (``modelcore.kernels._triton_util.jit``), so setting it here, at
conftest import, holds even if another test package imported ``modelcore.kernels`` first.
With CUDA present the same tests run compiled on the GPU, and the ``gpu`` ones run too.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests here are skipped, with the reason shown, without CUDA."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none present (kernels ran interpreted)")
    for item in items:
        if "gpu" in item.keywords and str(item.path).startswith(_HERE):
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
