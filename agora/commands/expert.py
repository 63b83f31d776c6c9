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
    progress_bar,
    resolve_base,
    shorten,
    stdout_console,
)

if TYPE_CHECKING:
    from registry.client import ModerationAction


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


REGISTRY_COMMANDS: dict[str, Callable[..., None]] = {
    "submit": submit,
    "list": list_experts,
    "download": download,
    "init": init,
    "disable": disable,
    "enable": enable,
    "withdraw": withdraw,
    "restore": restore,
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
