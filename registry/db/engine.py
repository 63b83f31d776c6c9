"""Engine construction and the migration-state check that guards start-up."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


class DatabaseNotMigrated(RuntimeError):
    """The database schema is missing or behind this code's migrations."""


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            # Routes run in a thread pool; SQLite serialises writers itself (busy_timeout).
            connect_args={"check_same_thread": False, "timeout": 30},
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            # WAL: a transaction's short lookups do not wait for a writer's fsync.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            # A deferred transaction that reads, then writes, fails at once with SQLITE_BUSY
            # when another writer committed in between (busy_timeout does not apply), e.g.
            # two versions of one expert submitted together. IMMEDIATE takes the write lock
            # up front, so transactions queue instead; they are all short (validation and
            # blob transfer happen outside them), so serialising them costs little.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """Alembic configured in code, so migrations run from an installed package too."""
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the migrations package is not installed beside registry")
    config = Config()
    config.set_main_option("script_location", str(spec.submodule_search_locations[0]))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def migration_state(engine: Engine) -> tuple[set[str], set[str]]:
    """(revisions applied to the database, head revisions of this code)."""
    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    return current, set(script.get_heads())


def ensure_migrated(engine: Engine) -> None:
    current, heads = migration_state(engine)
    if current != heads:
        where = engine.url.render_as_string(hide_password=True)
        state = ", ".join(sorted(current)) or "no schema"
        raise DatabaseNotMigrated(
            f"the database at {where} is not migrated to this version of Agora "
            f"(it has {state}; the code expects {', '.join(sorted(heads))}). "
            "Run `agora db upgrade` with the same AGORA_DATABASE_URL, then start again."
        )
