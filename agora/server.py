"""What the server-side commands (serve, db, admin) share: the settings, where the
registry's data is, and its runtime.

The data directory comes from ``--data-dir``, else ``AGORA_DATA_DIR``, else ``./.agora``
(registry/settings.py). The admin and db commands work on an *existing* registry: with
the embedded SQLite default and no database there, they refuse and say where they looked,
instead of creating an empty registry whose tokens the running server would not know.

FastAPI, SQLAlchemy and uvicorn are imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from agora.common import echo_err, require_extra

if TYPE_CHECKING:
    from registry.runtime import Runtime
    from registry.settings import Settings

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The registry's data directory (SQLite file, blobs); default AGORA_DATA_DIR, "
        "else ./.agora.",
        show_default=False,
    ),
]


def settings(data_dir: Path | None, command: str) -> Settings:
    require_extra("server", command)
    from registry.settings import Settings

    return Settings() if data_dir is None else Settings(data_dir=data_dir)


def existing_registry(data_dir: Path | None, command: str) -> Settings:
    """The settings of a registry that exists: with the embedded SQLite default, its
    database file must be in the data directory (an explicit AGORA_DATABASE_URL names
    a database that lives elsewhere, and is taken as given)."""
    found = settings(data_dir, command)
    if found.database_url:
        return found
    database = (found.data_dir / "agora.db").resolve()
    if not database.is_file():
        source = (
            "--data-dir"
            if data_dir is not None
            else "AGORA_DATA_DIR"
            if os.environ.get("AGORA_DATA_DIR")
            else "the default ./.agora in the current directory"
        )
        echo_err(
            f"error: no registry data in {found.data_dir.resolve()} (from {source}): "
            f"{database} does not exist. Run `agora {command}` where `agora serve` runs, or "
            "point at its data with --data-dir DIR or AGORA_DATA_DIR "
            "(AGORA_DATABASE_URL for PostgreSQL)."
        )
        raise typer.Exit(2)
    return found


def runtime(settings: Settings) -> Runtime:
    """The service's runtime, or a one-line refusal when the database is not migrated."""
    from registry.app import build_runtime
    from registry.db.engine import DatabaseNotMigrated
    from registry.metrics import Metrics

    try:
        return build_runtime(settings, Metrics())
    except DatabaseNotMigrated as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(code=2) from None
