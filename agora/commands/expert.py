"""``agora expert``: train an expert here (``train``), and the registry's experts:
``submit|list|download|init|disable|enable``.

``merge|distill|matrix`` moved to ``agora local`` (they compute on local files); their old
names here still run, hidden, with a deprecation line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from agora.commands import datasheet, local, train
from agora.common import LOCAL_PANEL, REGISTRY_PANEL, deprecated_command
from agora.modeling import DataCommand
from agora.remote import (
    DEFAULT_URL,
    BaseRevisionOption,
    RegistryOption,
    TokenOption,
    client,
    fitted_table,
    job_status,
    progress_bar,
    resolve_base,
    shorten,
    stdout_console,
)

if TYPE_CHECKING:
    from registry.client import Expert, ModerationAction


def submit(
    *,
    weights: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="Expert .safetensors")
    ],
    datasheet: Annotated[
        Path,
        typer.Option(exists=True, dir_okay=False, readable=True, help="Datasheet markdown file."),
    ],
    base: BaseRevisionOption = None,
    expert_id: Annotated[
        str | None, typer.Option("--expert-id", help="Add a new version of this expert.")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait for the check on arrival: exit 0 once active, 1 if flagged.",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds --wait waits at most.")
    ] = 600.0,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Submit an expert (weights + datasheet) to the registry."""
    with client(registry, token) as agora:
        revision = resolve_base(agora, base)
        with progress_bar(f"upload {weights.name}") as bar:
            submitted = agora.submit_expert(
                weights, datasheet, revision, expert_id=expert_id, progress=bar
            )
        typer.echo(f"submitted {submitted.id} version {submitted.version} ({submitted.status})")
        typer.echo(f"digest {submitted.digest}")
        expert = agora.get_expert(submitted.id)
        check = expert.arrival
        if check is None or check.version != submitted.version:
            return
        if not wait:
            typer.echo(
                f"quarantined until its check on arrival (job {check.job_id}) measures it on "
                "its datasheet samples against the base; --wait waits for it"
                if check.pending
                else f"check on arrival: {check.state}"
            )
            return
        if check.pending:
            with job_status(f"check on arrival, job {check.job_id}") as update:

                def poll(seen: Expert) -> None:
                    if seen.arrival is not None and seen.arrival.job_id is not None:
                        update(agora.jobs.get(seen.arrival.job_id))

                try:
                    expert = agora.experts.wait_for_arrival(
                        submitted.id, timeout=timeout, on_poll=poll
                    )
                except TimeoutError as exc:
                    typer.echo(str(exc), err=True)
                    raise typer.Exit(1) from None
    _print_arrival(expert)


def _print_arrival(expert: Expert) -> None:
    """The check's outcome; exit 1 unless the expert is active."""
    check = expert.arrival
    if check is None:
        return
    if check.bits_per_byte is not None and check.base_bits_per_byte is not None:
        change = "n/a" if check.relative_change is None else f"{check.relative_change:+.2%}"
        gain = check.min_gain or 0.0
        required = "the base" if gain == 0 else f"{-gain:+.2%}"
        typer.echo(
            f"check on arrival {check.state}: {check.bits_per_byte:.4f} bits/byte on its "
            f"samples, base {check.base_bits_per_byte:.4f} ({change}; passes below {required})"
        )
    else:
        typer.echo(f"check on arrival {check.state}" + (f": {check.error}" if check.error else ""))
    if expert.status == "active":
        typer.echo(f"{expert.id} is active")
        return
    report = f" (report {check.report_id})" if check.report_id is not None else ""
    typer.echo(f"{expert.id} is {expert.status}: flagged to moderators{report}", err=True)
    raise typer.Exit(1)


def list_experts(
    *,
    base: Annotated[
        str | None, typer.Option("--base", help="Only experts of this base revision.")
    ] = None,
    status: Annotated[str | None, typer.Option("--status", help="active, disabled, ...")] = None,
    q: Annotated[str | None, typer.Option("-q", "--query", help="Domain text to match.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """List experts, following the registry's pages."""
    with client(registry, token) as agora:
        experts = agora.list_experts(base_revision=base, status=status, q=q, limit=limit)
        if as_json:
            for expert in experts:
                typer.echo(json.dumps(expert.model_dump(mode="json"), sort_keys=True))
            return
        rows = [
            (
                expert.id,
                expert.name or "",
                shorten(expert.domain or "", 40),
                expert.status,
                str(expert.latest_version),
                expert.base_revision[:8],
            )
            for expert in experts
        ]
    if not rows:
        typer.echo("no experts match")
        return
    # What a user copies and scans (id, status, version, base) never shrinks: in a narrow
    # terminal the name and the domain give way, ending in an ellipsis.
    console = stdout_console()
    headers = ("id", "name", "domain", "status", "v", "base")
    table = fitted_table(console, headers, rows, shrink=("name", "domain"), right=("v",))
    console.print(table)


def download(
    *,
    expert_id: Annotated[str, typer.Argument(help="Expert id (ex_...).")],
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="Default: latest.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="File or directory to write (default: cache).")
    ] = None,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Download an expert's weights (resumable, sha256-verified, cached)."""
    with client(registry, token) as agora, progress_bar(f"download {expert_id}") as bar:
        path = agora.download(expert_id, version=version, dest=out, progress=bar)
    typer.echo(str(path))


def init(
    *,
    from_nearest: Annotated[
        Path,
        typer.Option(
            "--from-nearest",
            exists=True,
            readable=True,
            help="Your data: a text file or a directory of .txt files.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the starting weights.")],
    base: BaseRevisionOption = None,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Start a new expert from the existing one closest to your data.

    Its weights go to --out, for `agora expert train --init-from`."""
    with client(registry, token) as agora:
        nearest = agora.nearest_expert(from_nearest, resolve_base(agora, base))
        typer.echo(
            f"nearest expert {nearest.expert_id} v{nearest.version} "
            f"({nearest.name or 'unnamed'}; similarity {nearest.score:.3f})"
        )
        with progress_bar(f"download {nearest.expert_id}") as bar:
            path = agora.download(
                nearest.expert_id, version=nearest.version, dest=out, progress=bar
            )
    typer.echo(str(path))


def disable(
    *,
    expert_id: Annotated[str, typer.Argument(help="Expert id (ex_...).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required; recorded).")],
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Disable an expert (moderator): gone from search and downloads at once."""
    with client(registry, token) as agora:
        done = agora.disable_expert(expert_id, reason)
    _echo_moderation(done)


def _echo_moderation(done: ModerationAction) -> None:
    typer.echo(f"{done.expert_id} is {done.status} ({done.action} by {done.actor})")


def enable(
    *,
    expert_id: Annotated[str, typer.Argument(help="Expert id (ex_...).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required; recorded).")],
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Re-enable a disabled expert (moderator)."""
    with client(registry, token) as agora:
        done = agora.enable_expert(expert_id, reason)
    _echo_moderation(done)


def withdraw(
    *,
    expert_id: Annotated[str, typer.Argument(help="Expert id (ex_...).")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (recorded).")] = None,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Withdraw your own expert, and everything derived from it."""
    with client(registry, token) as agora:
        done = agora.withdraw_expert(expert_id, reason)
    _echo_moderation(done)


def restore(
    *,
    expert_id: Annotated[str, typer.Argument(help="Expert id (ex_...).")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (recorded).")] = None,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Restore your own withdrawn expert."""
    with client(registry, token) as agora:
        done = agora.restore_expert(expert_id, reason)
    _echo_moderation(done)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.2f}%"


def forgetting(
    *,
    expert_id: Annotated[str, typer.Argument(help="Expert id (ex_...).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """The proof of forgetting of an expert's disables: bits per byte with it, without it
    and for the base (docs/governance.md, "Proof of forgetting")."""
    with client(registry, token) as agora:
        reports = agora.moderation.forgetting(expert_id)
    if as_json:
        for report in reports:
            typer.echo(json.dumps(report.model_dump(mode="json", by_alias=True), sort_keys=True))
        return
    if not reports:
        typer.echo(f"{expert_id} has no forgetting reports (none is made before a disable)")
        return
    console = stdout_console()
    for report in reports:
        subject = report.composition_id or "the expert alone"
        typer.echo(
            f"#{report.id} {subject} ({report.method}; without: {report.without_method}) "
            f"v{report.version}: {report.status}"
        )
        if report.error:
            typer.echo(f"  error: {report.error}")
        if report.domain is None:
            continue
        d = report.domain
        rows = [
            (
                "domain",
                _number(d.with_),
                _number(d.without),
                _number(d.base),
                "",
                _percent(d.without_vs_base),
            )
        ]
        rows += [
            (name, _number(o.with_), _number(o.without), "", _percent(o.change), "")
            for name, o in report.others.items()
        ]
        headers = ("text set", "with", "without", "base", "vs with", "vs base")
        right = headers[1:]
        console.print(fitted_table(console, headers, rows, shrink=("text set",), right=right))


REGISTRY_COMMANDS: dict[str, Callable[..., None]] = {
    "submit": submit,
    "list": list_experts,
    "download": download,
    "init": init,
    "disable": disable,
    "enable": enable,
    "withdraw": withdraw,
    "restore": restore,
    "forgetting": forgetting,
}
# Old names of `agora local ...` commands, hidden from the help until they are removed.
MOVED_TO_LOCAL = tuple(name for name in local.COMMANDS if name != "eval")


def group() -> typer.Typer:
    app = typer.Typer(
        name="expert",
        help="Train an expert here; submit, list, download and moderate the registry's.",
        no_args_is_help=True,
    )
    # DataCommand: `--data A B` is `--data A --data B` (agora/modeling.py)
    app.command("train", rich_help_panel=LOCAL_PANEL, cls=DataCommand)(train.expert_train)
    app.command("datasheet", rich_help_panel=LOCAL_PANEL, cls=DataCommand)(
        datasheet.expert_datasheet
    )
    app.command("check", rich_help_panel=LOCAL_PANEL)(datasheet.expert_check)
    for name, command in REGISTRY_COMMANDS.items():
        app.command(name, rich_help_panel=REGISTRY_PANEL)(command)
    for name in MOVED_TO_LOCAL:
        moved = deprecated_command(local.COMMANDS[name], f"expert {name}", f"local {name}")
        app.command(name, hidden=True)(moved)
    return app
