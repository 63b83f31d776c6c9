"""Tiny artifacts for the worker tests: a random tiny base bundle and experts on disk.

Random weights are enough: the worker tests check what the worker does with files and
payloads (and that its numbers are the composition's), not that composition helps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.tiny_models import TEXTS, digest_of, make_tiny_base


def expert_ref(path: Path, name: str, version: int = 1) -> dict[str, Any]:
    return {
        "id": "exp_" + (name.upper() * 26)[:26],
        "version": version,
        "digest": digest_of(path),
        "size": path.stat().st_size,
    }


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_tiny_base(tmp_path_factory.mktemp("worker-tiny"))
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def make_ref():
    return expert_ref


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return list(TEXTS)
