"""``agora serve``: the registry on uvicorn, with one in-process worker when the embedded
default (SQLite) is on and the model extra is installed.

The worker is started here, from agora/commands/worker.py, once uvicorn listens: the
registry package never imports the worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agora import server
from agora.commands.worker import model_deps_installed, start_embedded
from agora.common import echo_err

if TYPE_CHECKING:
    from registry.settings import Settings


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    data_dir: server.DataDirOption = None,
) -> None:
    """Serve the registry (embedded default: SQLite + blobs under ./.agora/)."""
    settings = server.settings(data_dir, "serve")
    import uvicorn

    from registry.app import create_app

    # Check the database before uvicorn starts, so a refusal is one clear line, not a trace.
    # Opening it also removes the staging files of uploads a killed run left (app.py).
    runtime = server.runtime(settings)
    try:
        stale_tokens = server.revoke_dead_embedded_workers(settings, runtime)
    finally:
        runtime.engine.dispose()
    url = f"http://{host}:{port}"
    typer.echo(f"Agora registry on {url}")
    typer.echo(f"  pages:     {url}/  (sign in: {url}/sign-in)")
    typer.echo(f"  API docs:  {url}/docs")
    typer.echo(f"  database:  {settings.resolved_database_url}")
    typer.echo(f"  blobs:     {settings.resolved_storage_url}")
    typer.echo(f"  embedder:  {settings.embedder} (AGORA_EMBEDDER; search: POST /v1/search)")
    typer.echo("  admin token: agora admin create-token --role admin --name <you>")
    if stale_tokens:
        typer.echo(f"  revoked:   {stale_tokens} in-process worker token(s) of killed runs")
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level="info",
        http=server.http_protocol(settings.header_timeout_seconds),
    )
    uvicorn_server = uvicorn.Server(config)
    embedded = settings.should_run_embedded_worker and model_deps_installed()
    if settings.should_run_embedded_worker and not embedded:
        typer.echo("  worker:    none in-process (install the `model` extra); run `agora worker`")
    elif embedded:
        typer.echo("  worker:    one in-process (AGORA_EMBEDDED_WORKER=false turns it off)")
    else:
        typer.echo("  worker:    none in-process; run `agora worker --registry URL --token T`")
    if not embedded:
        uvicorn_server.run()
        return
    _serve_with_worker(uvicorn_server, settings, f"http://{_loopback(host)}:{port}")


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 (a comparison)


def _serve_with_worker(uvicorn_server: Any, settings: Settings, url: str) -> None:
    """Run uvicorn; once it listens, start the in-process worker with a worker token made
    for this run. On SIGINT/SIGTERM the worker is stopped *before* uvicorn closes its
    socket, so it can still complete or hand back its job over HTTP; then the token is
    revoked. A second signal exits at once (uvicorn's own force exit)."""
    from registry.services.tokens import create_token as make_token
    from registry.services.tokens import revoke_token

    runtime = server.runtime(settings)
    # Claimed before the token exists: if this run is killed, the next start revokes it.
    claim = server.claim_embedded_worker(settings)
    try:
        with runtime.sessions() as session, session.begin():
            token, secret = make_token(
                session=session,
                name=claim.name,
                role="worker",
                trusted=True,
                actor=server.SERVE_ACTOR,
            )
            token_id = token.id
    except BaseException:
        claim.release()
        raise
    finally:
        runtime.engine.dispose()
    stops: list[Callable[[], None]] = []
    lock = threading.Lock()
    finished = threading.Event()
    revoked = threading.Event()

    def stop_worker() -> None:
        with lock:
            while stops:
                stops.pop()()

    def revoke() -> None:
        # Also on the signal path: uvicorn re-raises SIGTERM once it has shut down, which
        # ends the process before a `finally` here would run.
        if revoked.is_set():
            return
        runtime = server.runtime(settings)
        try:
            with runtime.sessions() as session, session.begin():
                revoke_token(session=session, token_id=token_id, actor=server.SERVE_ACTOR)
            revoked.set()
            claim.release()
        finally:
            runtime.engine.dispose()

    def start_when_listening() -> None:
        while not uvicorn_server.started:
            if finished.wait(0.05):
                return
        try:
            stop = start_embedded(url, secret, settings.data_dir)
        except Exception as exc:  # the registry keeps serving without its worker
            echo_err(f"error: the in-process worker did not start: {exc}")
            return
        with lock:
            stops.append(stop)

    plain_exit = uvicorn_server.handle_exit
    exiting = threading.Event()

    def handle_exit(sig: int, frame: Any) -> None:
        if exiting.is_set():
            plain_exit(sig, frame)  # a second signal: uvicorn forces the exit
            return
        exiting.set()
        typer.echo("stopping the in-process worker (its job is finished or handed back)...")

        def stop_then_exit() -> None:
            try:
                stop_worker()
                revoke()
            finally:
                plain_exit(sig, frame)

        threading.Thread(target=stop_then_exit, name="serve-stop", daemon=True).start()

    uvicorn_server.handle_exit = handle_exit
    starter = threading.Thread(target=start_when_listening, name="serve-worker", daemon=True)
    starter.start()
    try:
        uvicorn_server.run()
    finally:
        finished.set()
        starter.join(timeout=5)
        stop_worker()
        revoke()
