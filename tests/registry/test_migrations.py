"""Alembic migrations: reversible on both backends; start-up refuses a stale PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect
from typer.testing import CliRunner

from registry.app import create_app
from registry.db.engine import (
    DatabaseNotMigrated,
    downgrade,
    make_engine,
    migration_state,
    upgrade,
)
from registry.db.models import Base
from registry.settings import Settings


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        upgrade(engine)
        assert _tables(empty_database_url) == set(Base.metadata.tables)
        current, heads = migration_state(engine)
        assert current == heads
        downgrade(engine, "base")
        assert _tables(empty_database_url) == set()
        assert migration_state(engine)[0] == set()
        upgrade(engine)
        assert _tables(empty_database_url) == set(Base.metadata.tables)
    finally:
        engine.dispose()


def test_models_match_the_migrations(empty_database_url: str) -> None:
    """Autogenerate finds nothing to do: the ORM and the reviewed migration agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(empty_database_url)
    try:
        upgrade(engine)
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_unmigrated_database_refuses_to_start(empty_database_url: str, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=empty_database_url, auto_migrate=False)
    with (
        pytest.raises(DatabaseNotMigrated, match="agora db upgrade"),
        TestClient(create_app(settings)),
    ):
        pass
    assert _tables(empty_database_url) == set()


def test_postgres_is_not_migrated_implicitly(postgres_admin_url: str, tmp_path) -> None:
    from conftest import temporary_postgres_schema

    with temporary_postgres_schema(postgres_admin_url) as url:
        settings = Settings(data_dir=tmp_path, database_url=url)
        assert settings.should_auto_migrate is False
        with pytest.raises(DatabaseNotMigrated), TestClient(create_app(settings)):
            pass


def test_embedded_sqlite_migrates_itself(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path / "fresh")
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
    assert (tmp_path / "fresh" / "agora.db").is_file()


def test_cli_serve_refuses_and_db_upgrade_fixes_it(
    empty_database_url: str, tmp_path, monkeypatch
) -> None:
    from agora.cli import build_app

    monkeypatch.setenv("AGORA_DATABASE_URL", empty_database_url)
    monkeypatch.setenv("AGORA_AUTO_MIGRATE", "false")
    monkeypatch.setenv("AGORA_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    refused = runner.invoke(build_app(), ["serve", "--port", "1"])
    assert refused.exit_code == 2
    assert "agora db upgrade" in refused.output
    upgraded = runner.invoke(build_app(), ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert _tables(empty_database_url) == set(Base.metadata.tables)


def test_database_at_an_unknown_revision_refuses_to_start(
    empty_database_url: str, tmp_path
) -> None:
    """A database migrated by a newer Agora (a revision this code lacks) is refused too."""
    from sqlalchemy import text

    engine = make_engine(empty_database_url)
    try:
        upgrade(engine)
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = 'from_the_future'"))
    finally:
        engine.dispose()
    settings = Settings(data_dir=tmp_path, database_url=empty_database_url, auto_migrate=False)
    with (
        pytest.raises(DatabaseNotMigrated, match="from_the_future"),
        TestClient(create_app(settings)),
    ):
        pass
