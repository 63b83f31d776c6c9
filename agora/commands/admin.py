"""``agora admin create-token|list-tokens|revoke-token|gc|fsck`` and worker suspensions
(``suspensions|lift-suspension``): maintenance of an existing registry, on its database
directly (run where the registry's data is, or point at it with ``--data-dir`` /
``AGORA_DATA_DIR``; see agora/server.py). ``audit`` and ``audit-verify`` read the audit
log over HTTP instead (``--registry``, ``--token``: a moderator's or an admin's)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated

import typer

from agora import server
from agora.commands import monitor
from agora.common import REGISTRY_PANEL, SERVER_PANEL, echo_err
from agora.remote import DEFAULT_URL, RegistryOption, TokenOption, client

ROLE_HELP = "contributor, moderator, admin or worker"
# The actor of the audit log entries these commands append (docs/governance.md).
ACTOR = "agora admin"


def create_token(
    role: Annotated[str, typer.Option(help=ROLE_HELP)],
    name: Annotated[str, typer.Option(help="Who the token is for; owns what it submits.")],
    trusted: Annotated[
        bool,
        typer.Option(help="A worker token whose outputs you vouch for (docs/jobs.md)."),
    ] = False,
    data_dir: server.DataDirOption = None,
) -> None:
    """Create a bearer token. It is printed once, as the last line; only its hash is kept."""
    settings = server.existing_registry(data_dir, "admin create-token")
    from registry.errors import AgoraError
    from registry.services.tokens import create_token as make_token

    runtime = server.runtime(settings)
    try:
        with runtime.sessions() as session, session.begin():
            token, secret = make_token(
                session=session, name=name, role=role, trusted=trusted, actor=ACTOR
            )
            token_id = token.id
    except AgoraError as exc:
        echo_err(f"error: {exc.detail}")
        raise typer.Exit(code=2) from None
    finally:
        runtime.engine.dispose()
    kind = f"trusted {role}" if trusted else role
    typer.echo(f"created {kind} token #{token_id} for {name!r}; it is shown only now:")
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
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    data_dir: server.DataDirOption = None,
) -> None:
    """Revoke a token; requests presenting it are refused from now on. Audited."""
    settings = server.existing_registry(data_dir, "admin revoke-token")
    from registry.errors import AgoraError
    from registry.services.tokens import revoke_token as revoke

    runtime = server.runtime(settings)
    try:
        with runtime.sessions() as session, session.begin():
            token = revoke(session=session, token_id=token_id, actor=ACTOR, reason=reason)
            name, role = token.name, token.role
    except AgoraError as exc:
        echo_err(f"error: {exc.detail}")
        raise typer.Exit(code=2) from None
    finally:
        runtime.engine.dispose()
    typer.echo(f"revoked token #{token_id} ({role} {name!r})")


def suspensions(data_dir: server.DataDirOption = None) -> None:
    """List suspended worker tokens: id, name, since when, and why."""
    settings = server.existing_registry(data_dir, "admin suspensions")
    from registry.services.workers import suspended_tokens

    runtime = server.runtime(settings)
    try:
        with runtime.sessions() as session, session.begin():
            rows = [
                (t.id, t.role, t.name, t.suspended_at, t.suspension_reason)
                for t in suspended_tokens(session=session)
            ]
    finally:
        runtime.engine.dispose()
    if not rows:
        typer.echo("no suspended tokens")
    for token_id, role, name, since, reason in rows:
        typer.echo(f"#{token_id}\t{role}\t{name}\tsuspended {since:%Y-%m-%d %H:%M}\t{reason}")


def lift_suspension(
    token_id: Annotated[int, typer.Argument(help="The #id `suspensions` shows.")],
    note: Annotated[str, typer.Option(help="Why it is lifted (kept in the audit log).")] = "",
    data_dir: server.DataDirOption = None,
) -> None:
    """Lift a worker token's suspension; the token may lease jobs again. Audited."""
    settings = server.existing_registry(data_dir, "admin lift-suspension")
    from registry.errors import AgoraError
    from registry.services.workers import lift_suspension as lift

    runtime = server.runtime(settings)
    try:
        with runtime.sessions() as session, session.begin():
            token = lift(session=session, token_id=token_id, actor=ACTOR, note=note)
            name, role = token.name, token.role
    except AgoraError as exc:
        echo_err(f"error: {exc.detail}")
        raise typer.Exit(code=2) from None
    finally:
        runtime.engine.dispose()
    typer.echo(f"lifted the suspension of token #{token_id} ({role} {name!r})")


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


def fsck(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document instead of the summary.")
    ] = False,
    data_dir: server.DataDirOption = None,
) -> None:
    """Check that every blob row's bytes are stored and unaltered; list leftovers."""
    settings = server.existing_registry(data_dir, "admin fsck")
    from registry.db.engine import (
        DatabaseNotMigrated,
        ensure_migrated,
        make_engine,
        make_sessionmaker,
    )
    from registry.errors import AgoraError
    from registry.services.fsck import check_storage
    from registry.storage import Staging, open_blob_store

    # Not server.runtime(): opening a runtime removes dead processes' staging files, and
    # this check only looks.
    engine = make_engine(settings.resolved_database_url)
    try:
        ensure_migrated(engine)
        with make_sessionmaker(engine)() as session:
            report = check_storage(
                session=session,
                store=open_blob_store(settings),
                staging=Staging(settings.staging_dir),
            )
    except (AgoraError, DatabaseNotMigrated) as exc:
        echo_err(f"error: {exc.detail if isinstance(exc, AgoraError) else exc}")
        raise typer.Exit(code=2) from None
    finally:
        engine.dispose()
    typer.echo(json.dumps(report.to_json(), indent=2) if as_json else str(report))
    if not report.clean:
        raise typer.Exit(code=1)


def audit(
    *,
    target: Annotated[
        str | None, typer.Option(help="Only entries on this: expert:ID, token:ID.")
    ] = None,
    actor: Annotated[str | None, typer.Option(help="Only this actor's entries.")] = None,
    action: Annotated[
        str | None, typer.Option(help="Only this action, e.g. expert.disable.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many entries.")] = 50,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """List the audit log, newest first: seq, time, actor, action, target, reason."""
    with client(registry, token) as agora:
        entries = list(agora.audit.list(target=target, actor=actor, action=action, limit=limit))
    if not entries:
        typer.echo("no audit entries")
    for e in entries:
        at = e.at.replace("T", " ")[:19]
        typer.echo(f"#{e.seq}\t{at}\t{e.actor}\t{e.action}\t{e.target}\t{e.reason}")


def audit_verify(*, registry: RegistryOption = DEFAULT_URL, token: TokenOption = None) -> None:
    with client(registry, token) as agora:
        report = agora.audit.verify()
    head = f"#{report.head.seq} {report.head.hash}" if report.head else "none (empty log)"
    broken = report.first_break
    if broken is None:
        typer.echo(f"ok: {report.count} entries chain up to the head; head {head}")
        return
    typer.echo(
        f"BROKEN at entry {broken.seq} (position {broken.position}): {broken.problem}: "
        f"{broken.detail}; expected {broken.expected}, found {broken.found}; "
        f"{report.count} entries verified before it; head {head}"
    )
    raise typer.Exit(code=1)


def group() -> typer.Typer:
    app = typer.Typer(
        name="admin",
        help="Administration: tokens, maintenance and the audit log.",
        no_args_is_help=True,
    )
    app.command("create-token", rich_help_panel=SERVER_PANEL)(create_token)
    app.command("list-tokens", rich_help_panel=SERVER_PANEL)(list_tokens)
    app.command("revoke-token", rich_help_panel=SERVER_PANEL)(revoke_token)
    app.command("suspensions", rich_help_panel=SERVER_PANEL)(suspensions)
    app.command("lift-suspension", rich_help_panel=SERVER_PANEL)(lift_suspension)
    app.command("gc", rich_help_panel=SERVER_PANEL)(gc)
    app.command(
        "fsck",
        rich_help_panel=SERVER_PANEL,
        help=(
            "Check that every blob row's bytes are stored and unaltered; list leftovers. "
            "Each blob is read back and hashed; orphan blobs, staging leftovers and "
            "unfinished Idempotency-Keys are listed. Changes nothing. Exit status 1 when a "
            "row names missing or damaged bytes, 0 otherwise."
        ),
    )(fsck)
    app.command("audit", rich_help_panel=REGISTRY_PANEL)(audit)
    app.command(
        "audit-verify",
        rich_help_panel=REGISTRY_PANEL,
        help=(
            "Have the registry recompute the audit log's hash chain. Prints the number "
            "of entries and the head's hash (keep it: a later run must still reach it), "
            "or the first break: a deleted entry (sequence_gap) or an altered one "
            "(hash_mismatch, prev_hash_mismatch). Exit status 1 on a break. "
            "docs/governance.md shows how to check the chain without the registry."
        ),
    )(audit_verify)
    app.add_typer(monitor.text_sets_group(), rich_help_panel=REGISTRY_PANEL)
    app.add_typer(monitor.monitor_group(), rich_help_panel=REGISTRY_PANEL)
    return app
