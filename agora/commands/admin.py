"""``agora admin create-token|list-tokens|revoke-token|gc``: maintenance of an existing
registry, on its database directly (run where the registry's data is, or point at it with
``--data-dir`` / ``AGORA_DATA_DIR``; see agora/server.py)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from agora import server
from agora.common import SERVER_PANEL, echo_err

ROLE_HELP = "contributor, moderator, admin or worker"


def create_token(
    role: Annotated[str, typer.Option(help=ROLE_HELP)],
    name: Annotated[str, typer.Option(help="Who the token is for; owns what it submits.")],
    data_dir: server.DataDirOption = None,
) -> None:
    """Create a bearer token. It is printed once, as the last line; only its hash is kept."""
    settings = server.existing_registry(data_dir, "admin create-token")
    from registry.errors import AgoraError
    from registry.services.tokens import create_token as make_token

    runtime = server.runtime(settings)
    try:
        with runtime.sessions() as session, session.begin():
            token, secret = make_token(session=session, name=name, role=role)
            token_id = token.id
    except AgoraError as exc:
        echo_err(f"error: {exc.detail}")
        raise typer.Exit(code=2) from None
    finally:
        runtime.engine.dispose()
    typer.echo(f"created {role} token #{token_id} for {name!r}; it is shown only now:")
    typer.echo(secret)


def list_tokens(data_dir: server.DataDirOption = None) -> None:
    """List tokens: id, role, name, the secret's first characters, and whether revoked."""
    settings = server.existing_registry(data_dir, "admin list-tokens")
    from registry.services.tokens import list_tokens as all_tokens

    runtime = server.runtime(settings)
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
    data_dir: server.DataDirOption = None,
) -> None:
    """Revoke a token; requests presenting it are refused from now on."""
    settings = server.existing_registry(data_dir, "admin revoke-token")
    from registry.errors import AgoraError
    from registry.services.tokens import revoke_token as revoke

    runtime = server.runtime(settings)
    try:
        with runtime.sessions() as session, session.begin():
            token = revoke(session=session, token_id=token_id)
            name, role = token.name, token.role
    except AgoraError as exc:
        echo_err(f"error: {exc.detail}")
        raise typer.Exit(code=2) from None
    finally:
        runtime.engine.dispose()
    typer.echo(f"revoked token #{token_id} ({role} {name!r})")


def gc(
    grace_seconds: Annotated[
        int | None,
        typer.Option(help="Keep unreferenced blobs younger than this (default: settings)."),
    ] = None,
    data_dir: server.DataDirOption = None,
) -> None:
    """Delete blobs no row references, once older than the grace period."""
    settings = server.existing_registry(data_dir, "admin gc")
    from registry.services import idempotency
    from registry.services.gc import collect_garbage

    grace = dt.timedelta(
        seconds=settings.blob_gc_grace_seconds if grace_seconds is None else grace_seconds
    )
    runtime = server.runtime(settings)
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


def group() -> typer.Typer:
    app = typer.Typer(
        name="admin", help="Administration: tokens and maintenance.", no_args_is_help=True
    )
    app.command("create-token", rich_help_panel=SERVER_PANEL)(create_token)
    app.command("list-tokens", rich_help_panel=SERVER_PANEL)(list_tokens)
    app.command("revoke-token", rich_help_panel=SERVER_PANEL)(revoke_token)
    app.command("gc", rich_help_panel=SERVER_PANEL)(gc)
    return app
