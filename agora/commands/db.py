"""``agora db upgrade``: migrate a registry's database to this version's schema."""

from __future__ import annotations

import typer

from agora import server
from agora.common import SERVER_PANEL


def upgrade(data_dir: server.DataDirOption = None) -> None:
    """Migrate the registry's database to this version's schema.

    The database is AGORA_DATABASE_URL, or the data directory's SQLite file (which
    `agora serve` creates and migrates itself)."""
    settings = server.existing_registry(data_dir, "db upgrade")
    from registry.db.engine import make_engine, migration_state
    from registry.db.engine import upgrade as migrate

    engine = make_engine(settings.resolved_database_url)
    try:
        migrate(engine)
        current, _ = migration_state(engine)
    finally:
        engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    typer.echo(f"database {where} is at revision {', '.join(sorted(current))}")


def group() -> typer.Typer:
    app = typer.Typer(name="db", help="Database migrations.", no_args_is_help=True)
    app.command("upgrade", rich_help_panel=SERVER_PANEL)(upgrade)
    return app
