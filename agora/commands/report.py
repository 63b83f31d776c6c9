"""``agora report create|list|show|resolve``: reports of experts (docs/governance.md,
"Reports"). Anyone with a token files one; moderators list the queue and resolve each,
dismissing it or disabling the expert; the reporter reads the outcome."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from agora.common import REGISTRY_PANEL
from agora.remote import (
    DEFAULT_URL,
    RegistryOption,
    TokenOption,
    client,
    fitted_table,
    shorten,
    stdout_console,
)
from registry.client.models import Report

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


STATUSES = ("open", "dismissed", "disabled")


def _evidence(text: str | None, path: Path | None) -> str | None:
    if text is not None and path is not None:
        raise typer.BadParameter("give --evidence or --evidence-file, not both")
    if path is None:
        return text
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror or exc}", param_hint="--evidence-file"
        ) from None
    except UnicodeDecodeError:
        raise typer.BadParameter(
            f"{path} is not UTF-8 text", param_hint="--evidence-file"
        ) from None


def _echo(report: Report) -> None:
    typer.echo(f"report {report.id} on {report.expert_id}: {report.status}")
    typer.echo(f"  reported by {report.reporter} at {report.created_at}: {report.reason}")
    if report.evidence.strip():
        typer.echo(f"  evidence ({len(report.evidence)} characters):")
        for line in report.evidence.strip().splitlines()[:20]:
            typer.echo(f"    {line}")
    if report.resolved_by is not None:
        note = f": {report.resolution}" if report.resolution else ""
        typer.echo(f"  {report.status} by {report.resolved_by} at {report.resolved_at}{note}")


def _print(report: Report, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True))
    else:
        _echo(report)


def create(
    *,
    expert_id: Annotated[str, typer.Argument(help="The expert to report (ex_...).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required).")],
    evidence: Annotated[
        str | None, typer.Option("--evidence", help="Supporting text (optional).")
    ] = None,
    evidence_file: Annotated[
        Path | None,
        typer.Option("--evidence-file", help="Read the supporting text from this file."),
    ] = None,
    as_json: JsonOption = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Report an expert to the moderators."""
    text = _evidence(evidence, evidence_file)
    with client(registry, token) as agora:
        report = agora.reports.create(expert_id, reason, evidence=text)
    _print(report, as_json)


def list_reports(
    *,
    status: Annotated[
        str | None, typer.Option("--status", help="open, dismissed or disabled.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100, help="At most this many.")] = 50,
    as_json: JsonOption = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Moderators: the queue (default open, oldest first). Others: their own reports."""
    if status is not None and status not in STATUSES:
        raise typer.BadParameter(
            f"{status!r} is not one of {', '.join(STATUSES)}", param_hint="--status"
        )
    with client(registry, token) as agora:
        reports = agora.reports.list(status=status, limit=limit)
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in reports], indent=2))
        return
    if not reports:
        typer.echo("no reports")
        return
    rows = [(str(r.id), r.status, r.expert_id, r.reporter, shorten(r.reason, 200)) for r in reports]
    console = stdout_console()
    headers = ("id", "status", "expert", "reporter", "reason")
    table = fitted_table(console, headers, rows, shrink=("reason", "reporter"), right=("id",))
    console.print(table)


def show(
    *,
    report_id: Annotated[int, typer.Argument(help="Report id.", min=1)],
    as_json: JsonOption = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """A report and its outcome (its reporter, moderators)."""
    with client(registry, token) as agora:
        report = agora.reports.get(report_id)
    _print(report, as_json)


def resolve(
    *,
    report_id: Annotated[int, typer.Argument(help="Report id.", min=1)],
    resolution: Annotated[
        Literal["dismiss", "disable"],
        typer.Argument(help="dismiss the report, or disable the expert."),
    ],
    note: Annotated[
        str | None, typer.Option("--note", help="Told to the reporter (recorded).")
    ] = None,
    as_json: JsonOption = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Resolve a report (moderator): dismiss it, or disable its expert."""
    with client(registry, token) as agora:
        report = agora.reports.resolve(report_id, resolution, note=note)
    _print(report, as_json)


def group() -> typer.Typer:
    app = typer.Typer(
        name="report",
        help="Report an expert; moderators resolve reports.",
        no_args_is_help=True,
    )
    app.command("create", rich_help_panel=REGISTRY_PANEL)(create)
    app.command("list", rich_help_panel=REGISTRY_PANEL)(list_reports)
    app.command("show", rich_help_panel=REGISTRY_PANEL)(show)
    app.command("resolve", rich_help_panel=REGISTRY_PANEL)(resolve)
    return app
