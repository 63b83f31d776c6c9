"""Retrieval fixtures: experts submitted through the real API, one per domain.

The parent conftest gives ``app``, ``client``, ``tokens``, ``base`` and ``api`` on SQLite and
PostgreSQL; the embedder is the hashing one (tests/conftest.py sets AGORA_EMBEDDER).
"""

from __future__ import annotations

import pytest
from helpers.retrieval import DOMAINS, Submitted, submit_domain


@pytest.fixture
def experts(api) -> dict[str, Submitted]:
    """One expert per domain on the stored base."""
    return {domain: submit_domain(api, domain, seed=i) for i, domain in enumerate(DOMAINS)}
