"""What the server-side commands (serve, db, admin) share: the settings, where the
registry's data is, and its runtime.

The data directory comes from ``--data-dir``, else ``AGORA_DATA_DIR``, else ``./.agora``
(registry/settings.py). The admin and db commands work on an *existing* registry: with
the embedded SQLite default and no database there, they refuse and say where they looked,
instead of creating an empty registry whose tokens the running server would not know.

FastAPI, SQLAlchemy and uvicorn are imported inside the functions.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from agora.common import echo_err, require_extra

if TYPE_CHECKING:
    from registry.runtime import Runtime
    from registry.settings import Settings
    from registry.storage.owners import OwnerLock

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


# -- `agora serve`: the request head's deadline, and what killed runs left behind ----------

# Under the data directory: one lock file per live `agora serve` with an in-process worker
# (registry/storage/owners.py). Its name is also the name of that run's worker token.
EMBEDDED_WORKER_RUNS = "embedded-workers"
EMBEDDED_WORKER_PREFIX = "embedded-worker-"
# The one name every run's token had before runs were told apart.
LEGACY_EMBEDDED_WORKER = "embedded-worker"
# The actor of the audit log entries of the embedded worker's token (docs/governance.md).
SERVE_ACTOR = "agora serve"


def http_protocol(header_timeout: float) -> type[asyncio.Protocol] | str:
    """uvicorn's HTTP/1.1 protocol (httptools) with a deadline on each request head.

    uvicorn bounds the idle time between requests (``timeout_keep_alive``) but not the
    time a client takes to send a request line and headers, nor the time a new connection
    may stay silent: one byte every few seconds holds a connection forever (slowloris).
    Here a connection is closed when a request head has not been completely received
    ``header_timeout`` seconds after the connection opened or the previous response ended.
    Bodies have their own deadline, in the app (registry/api/limits.py). ``0``: uvicorn's
    own protocol, no deadline.
    """
    if header_timeout <= 0:
        return "auto"
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadDeadlineProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle: object = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            # The request being answered now, if any: a new head completed replaces it.
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(header_timeout, self._head_deadline)

        def _head_deadline(self) -> None:
            self._head_timer = None
            cycle = self.cycle
            if cycle is not self._head_cycle:
                return  # a request head arrived in time
            if cycle is not None and not cycle.response_complete:
                return  # a pipelined request is still being answered; re-armed after it
            if not self.transport.is_closing():
                self.transport.close()

    return HeadDeadlineProtocol


def claim_embedded_worker(settings: Settings) -> OwnerLock:
    """This run's claim for its in-process worker: held while `agora serve` lives; its
    name is the worker token's name, so a later start can revoke the token of a run that
    was killed (``revoke_dead_embedded_workers``)."""
    from registry.storage.owners import OwnerLock

    return OwnerLock.acquire(
        settings.data_dir / EMBEDDED_WORKER_RUNS, prefix=EMBEDDED_WORKER_PREFIX
    )


def revoke_dead_embedded_workers(settings: Settings, runtime: Runtime) -> int:
    """Revoke the worker tokens of earlier `agora serve` runs of this data directory that
    are gone (killed before they could revoke their own); live runs keep theirs. With the
    embedded SQLite default, the database is this directory's own, so tokens of runs from
    before runs had claims (all named ``embedded-worker``) are revoked too. Returns how
    many tokens were revoked."""
    from sqlalchemy import select

    from registry.db.models import Token
    from registry.services.tokens import revoke_token
    from registry.storage.owners import reap_dead

    revoked = 0

    def revoke(name: str) -> None:
        nonlocal revoked
        with runtime.sessions() as session, session.begin():
            stale = session.scalars(
                select(Token.id).where(Token.name == name, Token.revoked_at.is_(None))
            ).all()
            for token_id in stale:
                revoke_token(session=session, token_id=token_id, actor=SERVE_ACTOR)
        revoked += len(stale)

    reap_dead(
        settings.data_dir / EMBEDDED_WORKER_RUNS, prefix=EMBEDDED_WORKER_PREFIX, on_dead=revoke
    )
    if not settings.database_url:
        revoke(LEGACY_EMBEDDED_WORKER)
    return revoked
