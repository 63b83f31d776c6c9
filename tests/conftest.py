"""Shared test configuration: databases (SQLite and PostgreSQL) and an S3 server on loopback.

Every database test runs on SQLite *and* PostgreSQL by depending on ``database_url``
(migrated once per backend, emptied after each test) or ``empty_database_url`` (a fresh,
un-migrated database). PostgreSQL comes from ``AGORA_TEST_DATABASE_URL`` (for example
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``): each test database is created
from it with a unique name and dropped afterwards. Unset, the PostgreSQL variants are
skipped with a reason; set but unreachable, they fail: CI must not pass without them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Tests embed with the hashing embedder (no model, microseconds); the one test of the real
# MiniLM asks for it explicitly. Inherited by the servers tests start as subprocesses.
os.environ.setdefault("AGORA_EMBEDDER", "hashing")
# The corpus tests train on reads only these distributions' LICENSE files and READMEs, so a
# test tool added to the venv does not change every trained model (and the numbers the
# harm and learning tests check). Inherited by subprocesses, like the embedder.
os.environ.setdefault(
    "AGORA_CORPUS_DISTRIBUTIONS",
    str(Path(__file__).parent / "helpers" / "corpus_distributions.txt"),
)

# Checks on arrival (docs/governance.md) quarantine every submitted expert until a worker
# has measured it; most tests submit and then search or compose at once with no worker
# running, so they run with the checks off. tests/registry/test_arrival_checks.py and the
# README's quickstart (tests/e2e/test_readme.py, whose server runs a worker) turn them on.
# Inherited by subprocesses, like the embedder.
os.environ.setdefault("AGORA_ARRIVAL_CHECKS", "false")

# The S3 server on loopback (moto's server mode): fixtures s3_server and s3_storage_url.
pytest_plugins = ["s3_fixture"]

PG_ENV = "AGORA_TEST_DATABASE_URL"
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"PostgreSQL variant: set {PG_ENV}=postgresql+psycopg://... to run it")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.fail(f"{PG_ENV} is set but PostgreSQL is unreachable: {exc}", pytrace=False)
    finally:
        engine.dispose()
    return url


@contextmanager
def temporary_postgres_database(admin_url: str) -> Iterator[str]:
    """Create a uniquely named database next to ``admin_url``'s; drop it afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"agora_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def temporary_postgres_schema(admin_url: str) -> Iterator[str]:
    """A uniquely named, empty schema first on the search path of the returned URL.

    As isolated as a database for the tests that need an un-migrated one, and much cheaper:
    CREATE/DROP DATABASE each force a checkpoint, seconds apiece on a busy disk.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"agora_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{name}"'))
        try:
            url = make_url(admin_url).update_query_dict({"options": f"-csearch_path={name}"})
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    finally:
        admin.dispose()


@contextmanager
def _database(
    kind: str, request: pytest.FixtureRequest, directory: Path, *, cheap: bool = False
) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'agora.db'}"
        return
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    temporary = temporary_postgres_schema if cheap else temporary_postgres_database
    with temporary(admin_url) as url:
        yield url


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database per backend for the whole session, migrated once with Alembic."""
    from registry.db.engine import make_engine, upgrade

    with _database(request.param, request, tmp_path_factory.mktemp("db")) as url:
        engine = make_engine(url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        yield url


@pytest.fixture
def database_url(migrated_database_url: str) -> Iterator[str]:
    """A migrated database, emptied after the test (tests commit, as the routes do)."""
    yield migrated_database_url
    from helpers.databases import empty_tables

    empty_tables(migrated_database_url)


@pytest.fixture(params=BACKENDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database with no schema at all, on each backend."""
    with _database(request.param, request, tmp_path, cheap=True) as url:
        yield url
