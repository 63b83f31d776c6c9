"""``agora job get|list``: the registry's jobs (compositions, evaluations), as JSON."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from agora.common import REGISTRY_PANEL
from agora.remote import DEFAULT_URL, RegistryOption, TokenOption, client, job_status
from registry.client import Job, JobFailed


def get(
    *,
    job_id: Annotated[str, typer.Argument(help="Job id (job_...).")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job ends.")] = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """A job's status, progress, result or error, as JSON."""
    with client(registry, token) as agora:
        handle = agora.job(job_id)
        if wait:
            with job_status(job_id) as show:
                try:
                    job = handle.wait(progress=show)
                except JobFailed as exc:
                    job = exc.job if isinstance(exc.job, Job) else handle.refresh()
        else:
            job = handle.refresh()
    typer.echo(json.dumps(job.model_dump(mode="json", exclude_unset=True), indent=2))
    if job.status in ("failed", "dead"):
        raise typer.Exit(1)


def list_jobs(
    *,
    status: Annotated[
        str | None, typer.Option("--status", help="queued, leased, succeeded, failed, dead.")
    ] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help="e.g. compose.<method>, evaluate.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many.")] = None,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Jobs by status and kind, one JSON object per line (moderators and admins)."""
    with client(registry, token) as agora:
        jobs = agora.list_jobs(status=status, kind=kind, limit=limit)
    for job in jobs:
        typer.echo(json.dumps(job.model_dump(mode="json", exclude_unset=True), sort_keys=True))


def group() -> typer.Typer:
    app = typer.Typer(name="job", help="Jobs computed by workers.", no_args_is_help=True)
    app.command("get", rich_help_panel=REGISTRY_PANEL)(get)
    app.command("list", rich_help_panel=REGISTRY_PANEL)(list_jobs)
    return app
