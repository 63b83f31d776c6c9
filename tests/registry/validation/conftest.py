"""Fixtures for the validator tests: a small base revision and its expert schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers.artifacts import base_revision, make_base_files, make_expert_schema


@pytest.fixture(scope="session")
def schema() -> dict[str, Any]:
    return make_expert_schema(n_layers=2, d_model=8, d_ffn=12)


@pytest.fixture(scope="session")
def revision(schema: dict[str, Any]) -> str:
    return base_revision(make_base_files(schema))


@pytest.fixture
def write(tmp_path: Path):
    counter = iter(range(1_000_000))

    def _write(data: bytes) -> Path:
        path = tmp_path / f"f{next(counter)}.safetensors"
        path.write_bytes(data)
        return path

    return _write
