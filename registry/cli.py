"""``agora serve``, ``agora db upgrade``, ``agora admin create-token`` and ``agora admin gc``.

Cheap to import: FastAPI, SQLAlchemy and uvicorn are imported inside the commands, so
``agora --help`` and the SDK-only install stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from registry.runtime import Runtime
    from registry.settings import Settings

ROLE_HELP = "contributor, moderator, admin or worker"

ServeHook = Callable[[str, str, Path], Callable[[], None]]
SERVE_HOOKS: list[ServeHook] = []
"""Started by ``agora serve`` once it listens, when the embedded worker is on: each hook gets
(registry URL, a fresh worker token, the data directory) and returns a stop function,
called at shutdown. The worker package registers one (the registry never imports it)."""


def _settings() -> Settings:
    from registry.settings import Settings

    return Settings()


def _runtime(settings: Settings) -> Runtime:
    """The service's runtime, or a one-line refusal when the database is not migrated."""
    from registry.app import build_runtime
    from registry.db.engine import DatabaseNotMigrated
    from registry.metrics import Metrics

    try:
        return build_runtime(settings, Metrics())
    except DatabaseNotMigrated as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Serve the registry (embedded default: SQLite + blobs under ./.agora/)."""
    import uvicorn

    from registry.app import create_app

    settings = _settings()
    # Check the database before uvicorn starts, so a refusal is one clear line, not a trace.
    _runtime(settings).engine.dispose()
    url = f"http://{host}:{port}"
    typer.echo(f"Agora registry on {url}")
    typer.echo(f"  API docs:  {url}/docs")
    typer.echo(f"  database:  {settings.resolved_database_url}")
    typer.echo(f"  blobs:     {settings.resolved_storage_url}")
    typer.echo(f"  embedder:  {settings.embedder} (AGORA_EMBEDDER; search: POST /v1/search)")
    typer.echo("  admin token: agora admin create-token --role admin --name <you>")
    config = uvicorn.Config(create_app(settings), host=host, port=port, log_level="info")
    server = uvicorn.Server(config)
    embedded = settings.should_run_embedded_worker and bool(SERVE_HOOKS)
    if settings.should_run_embedded_worker and not SERVE_HOOKS:
        typer.echo("  worker:    none in-process (install the `model` extra); run `agora worker`")
    elif embedded:
        typer.echo("  worker:    one in-process (AGORA_EMBEDDED_WORKER=false turns it off)")
    else:
        typer.echo("  worker:    none in-process; run `agora worker --registry URL --token T`")
    if not embedded:
        server.run()
        return
    _serve_with_hooks(server, settings, f"http://{_loopback(host)}:{port}")


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 (a comparison)


def _serve_with_hooks(server: Any, settings: Settings, url: str) -> None:
    """Run uvicorn; once it listens, start the hooks (the in-process worker) with a worker
    token made for this run. On SIGINT/SIGTERM the hooks are stopped *before* uvicorn closes
    its socket, so the worker can still complete or hand back its job over HTTP; then the
    token is revoked. A second signal exits at once (uvicorn's own force exit)."""
    import threading

    from registry.services.tokens import create_token as make_token
    from registry.services.tokens import revoke_token

    runtime = _runtime(settings)
    try:
        with runtime.sessions() as session, session.begin():
            token, secret = make_token(session=session, name="embedded-worker", role="worker")
            token_id = token.id
    finally:
        runtime.engine.dispose()
    stops: list[Callable[[], None]] = []
    lock = threading.Lock()
    finished = threading.Event()

    revoked = threading.Event()

    def stop_hooks() -> None:
        with lock:
            while stops:
                stops.pop()()

    def revoke() -> None:
        # Also on the signal path: uvicorn re-raises SIGTERM once it has shut down, which
        # ends the process before a `finally` here would run.
        if revoked.is_set():
            return
        runtime = _runtime(settings)
        try:
            with runtime.sessions() as session, session.begin():
                revoke_token(session=session, token_id=token_id)
            revoked.set()
        finally:
            runtime.engine.dispose()

    def start_when_listening() -> None:
        while not server.started:
            if finished.wait(0.05):
                return
        for hook in SERVE_HOOKS:
            try:
                stop = hook(url, secret, settings.data_dir)
            except Exception as exc:  # the registry keeps serving without its worker
                typer.echo(f"error: the in-process worker did not start: {exc}", err=True)
                continue
            with lock:
                stops.append(stop)

    plain_exit = server.handle_exit
    exiting = threading.Event()

    def handle_exit(sig: int, frame: Any) -> None:
        if exiting.is_set():
            plain_exit(sig, frame)  # a second signal: uvicorn forces the exit
            return
        exiting.set()
        typer.echo("stopping the in-process worker (its job is finished or handed back)...")

        def stop_then_exit() -> None:
            try:
                stop_hooks()
                revoke()
            finally:
                plain_exit(sig, frame)

        threading.Thread(target=stop_then_exit, name="serve-stop", daemon=True).start()

    server.handle_exit = handle_exit
    starter = threading.Thread(target=start_when_listening, name="serve-hooks", daemon=True)
    starter.start()
    try:
        server.run()
    finally:
        finished.set()
        starter.join(timeout=5)
        stop_hooks()
        revoke()


def db_upgrade() -> None:
    """Migrate the database at AGORA_DATABASE_URL to this version's schema."""
    from registry.db.engine import make_engine, migration_state, upgrade

    settings = _settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade(engine)
        current, _ = migration_state(engine)
    finally:
        engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    typer.echo(f"database {where} is at revision {', '.join(sorted(current))}")


def create_token(
    role: Annotated[str, typer.Option(help=ROLE_HELP)],
    name: Annotated[str, typer.Option(help="Who the token is for; owns what it submits.")],
) -> None:
    """Create a bearer token. It is printed once, as the last line; only its hash is kept."""
    from registry.errors import AgoraError
    from registry.services.tokens import create_token as make_token

    runtime = _runtime(_settings())
    try:
        with runtime.sessions() as session, session.begin():
            token, secret = make_token(session=session, name=name, role=role)
            token_id = token.id
    except AgoraError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(code=2) from None
    finally:
        runtime.engine.dispose()
    typer.echo(f"created {role} token #{token_id} for {name!r}; it is shown only now:")
    typer.echo(secret)


def list_tokens() -> None:
    """List tokens: id, role, name, the secret's first characters, and whether revoked."""
    from registry.services.tokens import list_tokens as all_tokens

    runtime = _runtime(_settings())
    try:
        with runtime.sessions() as session, session.begin():
            rows = [
                (t.id, t.role, t.name, t.prefix, t.created_at, t.revoked_at)
                for t in all_tokens(session=session)
            ]
    finally:
        runtime.engine.dispose()
    for token_id, role, name, prefix, created, revoked in rows:
        state = f"revoked {revoked:%Y-%m-%d %H:%M}" if revoked else "active"
        typer.echo(f"#{token_id}\t{role}\t{name}\t{prefix}...\t{created:%Y-%m-%d %H:%M}\t{state}")


def revoke_token(
    token_id: Annotated[int, typer.Argument(help="The #id `list-tokens` shows.")],
) -> None:
    """Revoke a token; requests presenting it are refused from now on."""
    from registry.errors import AgoraError
    from registry.services.tokens import revoke_token as revoke

    runtime = _runtime(_settings())
    try:
        with runtime.sessions() as session, session.begin():
            token = revoke(session=session, token_id=token_id)
            name, role = token.name, token.role
    except AgoraError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(code=2) from None
    finally:
        runtime.engine.dispose()
    typer.echo(f"revoked token #{token_id} ({role} {name!r})")


def gc(
    grace_seconds: Annotated[
        int | None,
        typer.Option(help="Keep unreferenced blobs younger than this (default: settings)."),
    ] = None,
) -> None:
    """Delete blobs no row references, once older than the grace period."""
    import datetime as dt

    from registry.services import idempotency
    from registry.services.gc import collect_garbage

    settings = _settings()
    grace = dt.timedelta(
        seconds=settings.blob_gc_grace_seconds if grace_seconds is None else grace_seconds
    )
    runtime = _runtime(settings)
    try:
        with runtime.sessions() as session:
            # collect_garbage commits its own phases: rows go before the objects they name.
            report = collect_garbage(
                session=session, store=runtime.store, staging=runtime.staging, grace=grace
            )
            with session.begin():
                pruned = idempotency.prune(
                    session=session,
                    older_than=dt.timedelta(seconds=settings.idempotency_ttl_seconds),
                )
    finally:
        runtime.engine.dispose()
    typer.echo(str(report))
    typer.echo(f"expired idempotency keys removed: {pruned}")


def register(root: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    root.command("serve")(serve)
    groups["db"].command("upgrade")(db_upgrade)
    groups["admin"].command("create-token")(create_token)
    groups["admin"].command("list-tokens")(list_tokens)
    groups["admin"].command("revoke-token")(revoke_token)
    groups["admin"].command("gc")(gc)
