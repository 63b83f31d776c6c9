"""``agora admin text-sets upload|list`` and ``agora admin monitor schedule|list|cancel|
runs``: monitoring over HTTP through ``agora.monitoring`` (``--registry``, ``--token``: a
moderator's or an admin's; docs/governance.md, "Monitoring"). Lists are tables that fit the
terminal (``--json`` has every field); times are UTC."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from agora.remote import (
    DEFAULT_URL,
    RegistryOption,
    TokenOption,
    client,
    fitted_table,
    shorten,
    stdout_console,
)
from registry.client.models import MonitorRun, MonitorSchedule, TextSet

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _iso(value: dt.datetime) -> str:
    return _utc(value).isoformat().replace("+00:00", "Z")


def _when(value: dt.datetime) -> str:
    """A table's time: UTC to the minute."""
    return _utc(value).strftime("%Y-%m-%d %H:%M")


def _hours(every_hours: float | None) -> str:
    return "once" if every_hours is None else f"{every_hours:g} h"


def _print_json(models: Sequence[BaseModel]) -> None:
    typer.echo(json.dumps([m.model_dump(mode="json") for m in models], indent=2))


def _texts(paths: list[Path], text_field: str) -> list[str]:
    """The texts of FILE...: read as ``agora expert train --data`` reads them (files,
    folders, JSON Lines; docs/data.md)."""
    from modelcore.data.userdata import DataError, read_documents

    try:
        docs, _ = read_documents(paths, text_field=text_field, strict_utf8=False)
    except DataError as exc:
        raise typer.BadParameter(str(exc), param_hint="FILE") from exc
    return [d.text for d in docs]


def upload(
    files: Annotated[
        list[Path], typer.Argument(help="Text files, folders or JSON Lines.", show_default=False)
    ],
    *,
    name: Annotated[str, typer.Option(help="The set's name, e.g. news.")],
    date: Annotated[str, typer.Option(help="The set's own date, YYYY-MM-DD.")],
    text_field: Annotated[str, typer.Option(help="The text field of JSON Lines.")] = "text",
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Upload a named, dated text set that monitoring runs measure every expert on."""
    texts = _texts(files, text_field)
    with client(registry, token) as agora:
        made = agora.monitoring.upload_text_set(name, date, texts)
    typer.echo(f"text set #{made.id} {made.key}: {made.n_texts} texts, {made.bytes} bytes")


def _text_set_row(s: TextSet) -> tuple[str, ...]:
    return (str(s.id), s.key, str(s.n_texts), str(s.bytes), s.uploader, _when(s.created_at))


def list_sets(
    *,
    name: Annotated[str | None, typer.Option(help="Only the sets of this name.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="At most this many.")] = 50,
    as_json: JsonOption = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """List text sets, newest first: id, name@date, texts, bytes, uploader, upload time."""
    with client(registry, token) as agora:
        sets = agora.monitoring.text_sets(name, limit=limit)
    if as_json:
        _print_json(sets)
        return
    if not sets:
        typer.echo("no text sets")
        return
    console = stdout_console()
    headers = ("id", "text set", "texts", "bytes", "uploader", "uploaded")
    rows = [_text_set_row(s) for s in sets]
    table = fitted_table(
        console,
        headers,
        rows,
        shrink=("text set", "uploader"),
        right=("id", "texts", "bytes"),
    )
    console.print(table)


def _not_before(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter("not an ISO 8601 time", param_hint="--not-before") from None
    if when.tzinfo is None:
        raise typer.BadParameter(
            "needs a timezone, e.g. 2026-12-01T00:00:00Z", param_hint="--not-before"
        )
    return when


def schedule(
    *,
    not_before: Annotated[
        str | None,
        typer.Option(help="No run before this time, ISO 8601 with a zone (default: now)."),
    ] = None,
    every_hours: Annotated[
        float | None, typer.Option(help="Repeat: each expert's next run this many hours later.")
    ] = None,
    text_set: Annotated[
        list[str] | None,
        typer.Option("--text-set", help="A set name (its newest date); repeat. Default: all."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many sets, newest first.")
    ] = None,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Queue one monitoring evaluation per active expert (and repeat them)."""
    start = _not_before(not_before)
    with client(registry, token) as agora:
        made = agora.monitoring.schedule(
            start, every_hours=every_hours, text_sets=text_set or None, limit=limit
        )
    every = f", every {made.every_hours} h" if made.every_hours else ""
    typer.echo(
        f"schedule #{made.id}: {len(made.jobs)} expert(s) from {_iso(made.not_before)}{every}"
    )


def _chosen(text_sets: dict[str, object]) -> str:
    """The sets a schedule measures on: its names (the newest set of each) or all."""
    names = text_sets.get("names")
    chosen = ", ".join(str(n) for n in names) if isinstance(names, list) and names else "all"
    limit = text_sets.get("limit")
    return f"{chosen} (at most {limit})" if limit is not None else chosen


def _schedule_row(s: MonitorSchedule) -> tuple[str, ...]:
    state = "cancelled" if s.cancelled_at is not None else "active"
    return (
        str(s.id),
        _when(s.not_before),
        _hours(s.every_hours),
        f"{s.completed}/{s.runs}",
        str(s.flagged),
        state,
        shorten(_chosen(s.text_sets), 200),
        s.created_by,
    )


def list_schedules(
    *,
    limit: Annotated[int, typer.Option(min=1, max=200, help="At most this many.")] = 50,
    as_json: JsonOption = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """List schedules, newest first: id, start, interval, runs done/queued, flags."""
    with client(registry, token) as agora:
        schedules = agora.monitoring.schedules(limit=limit)
    if as_json:
        _print_json(schedules)
        return
    if not schedules:
        typer.echo("no monitoring schedules")
        return
    console = stdout_console()
    headers = ("id", "from", "every", "runs", "flagged", "state", "text sets", "by")
    table = fitted_table(
        console,
        headers,
        [_schedule_row(s) for s in schedules],
        shrink=("text sets", "by"),
        right=("id", "runs", "flagged"),
    )
    console.print(table)


def cancel(
    schedule_id: Annotated[int, typer.Argument(help="The #id `monitor list` shows.")],
    *,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Cancel a schedule: no more runs; its queued jobs are cancelled."""
    with client(registry, token) as agora:
        done = agora.monitoring.cancel_schedule(schedule_id)
    typer.echo(f"cancelled schedule #{done.id} and {len(done.cancelled_jobs)} queued job(s)")


def _run_row(r: MonitorRun) -> tuple[str, ...]:
    queued = r.completed_at is None
    bpb = "-" if r.own_bits_per_byte is None else f"{r.own_bits_per_byte:.3f}"
    change = "-" if r.worsening is None else f"{r.worsening:+.1%}"
    rep = "-" if r.repetition is None else f"{r.repetition:.2f}"
    base = "-" if r.base_repetition is None else f"{r.base_repetition:.2f}"
    report = f"#{r.report_id}" if r.report_id is not None else ("queued" if queued else "")
    return (
        f"{r.expert_id}@{r.version}",
        "-" if queued else bpb,
        "-" if queued else change,
        report,
        _when(r.run_at),
        "-" if queued else f"{rep} (base {base})",
    )


def runs(
    *,
    expert: Annotated[str | None, typer.Option(help="Only this expert's runs.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="At most this many.")] = 50,
    as_json: JsonOption = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """List runs, newest first: expert@version, bits/byte and its change against the
    reference, the report a run raised (or ``queued``), run time, repetition."""
    with client(registry, token) as agora:
        found = agora.monitoring.runs(expert, limit=limit)
    if as_json:
        _print_json(found)
        return
    if not found:
        typer.echo("no monitoring runs")
        return
    # The expert's id and the numbers never shrink; at 80 columns repetition gives way
    # first (--json has it), then the run time shortens.
    console = stdout_console()
    headers = ("expert", "bpb", "vs ref", "report", "run at", "repetition")
    table = fitted_table(
        console,
        headers,
        [_run_row(r) for r in found],
        shrink=("run at", "repetition"),
        right=("bpb", "vs ref"),
    )
    console.print(table)


def text_sets_group() -> typer.Typer:
    app = typer.Typer(
        name="text-sets", help="Named, dated text sets for monitoring.", no_args_is_help=True
    )
    app.command("upload")(upload)
    app.command("list")(list_sets)
    return app


def monitor_group() -> typer.Typer:
    app = typer.Typer(
        name="monitor",
        help="Scheduled monitoring of every active expert.",
        no_args_is_help=True,
    )
    app.command("schedule")(schedule)
    app.command("list")(list_schedules)
    app.command("cancel")(cancel)
    app.command("runs")(runs)
    return app
