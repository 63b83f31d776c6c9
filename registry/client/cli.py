"""``agora expert submit|list|download|init``, ``agora search`` and ``agora expert
disable|enable``: the SDK on the command line.

The registry URL and token come from ``--registry`` / ``--token`` or the environment
(``AGORA_REGISTRY_URL``, ``AGORA_TOKEN``). Errors print as one line with their code and
exit non-zero, so scripts can switch on them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from registry.client.client import DEFAULT_TEMPERATURE, DEFAULT_URL, Agora, ProgressCallback
from registry.client.errors import AgoraError

RegistryOption = Annotated[
    str,
    typer.Option(
        "--registry", envvar="AGORA_REGISTRY_URL", help="Registry base URL.", show_default=True
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="AGORA_TOKEN", help="Bearer token (agora_...).", show_default=False
    ),
]

_err = Console(stderr=True)


@contextmanager
def _client(registry: str, token: str | None) -> Iterator[Agora]:
    """An SDK client whose errors end the command with one line and exit status 1."""
    try:
        with Agora(registry, token=token) as agora:
            yield agora
    except AgoraError as exc:
        status = f"HTTP {exc.status}" if exc.status is not None else "no response"
        line = f"{exc.detail} ({status})"
        _err.print(f"[bold red]error[/] {escape(f'[{exc.code}]')} {escape(line)}", soft_wrap=True)
        for field in exc.errors[:10]:
            _err.print(f"  - {_describe_field_error(field)}", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _describe_field_error(field: dict[str, Any]) -> str:
    where = (
        field.get("tensor") or field.get("field") or field.get("loc") or field.get("pointer") or ""
    )
    message = field.get("msg") or field.get("detail") or field.get("message") or field
    return f"{where}: {message}" if where else str(message)


@contextmanager
def _progress_bar(description: str) -> Iterator[ProgressCallback]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_err,
        transient=True,
    )
    task = progress.add_task(description, total=None)

    def update(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        yield update


def _submit(
    *,
    weights: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="Expert .safetensors")
    ],
    datasheet: Annotated[
        Path,
        typer.Option(exists=True, dir_okay=False, readable=True, help="Datasheet markdown file."),
    ],
    base: Annotated[str, typer.Option("--base", help="Base model revision the expert fits.")],
    expert_id: Annotated[
        str | None, typer.Option("--expert-id", help="Add a new version of this expert.")
    ] = None,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Submit an expert (weights + datasheet) to the registry."""
    with _client(registry, token) as agora, _progress_bar(f"upload {weights.name}") as bar:
        submitted = agora.submit_expert(weights, datasheet, base, expert_id=expert_id, progress=bar)
    typer.echo(f"submitted {submitted.id} version {submitted.version} ({submitted.status})")
    typer.echo(f"digest {submitted.digest}")


def _list(
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
    with _client(registry, token) as agora:
        experts = agora.list_experts(base_revision=base, status=status, q=q, limit=limit)
        if as_json:
            for expert in experts:
                typer.echo(json.dumps(expert.model_dump(mode="json"), sort_keys=True))
            return
        rows = [
            (
                expert.id,
                expert.name or "",
                _shorten(expert.domain or "", 40),
                expert.status,
                str(expert.latest_version),
                expert.base_revision[:8],
            )
            for expert in experts
        ]
    if not rows:
        typer.echo("no experts match")
        return
    table = Table()
    # Ids and statuses are what a user copies and scans: they never shrink; text columns do.
    table.add_column("id", no_wrap=True, min_width=max(len(r[0]) for r in rows))
    table.add_column("name", overflow="ellipsis", no_wrap=True)
    table.add_column("domain", overflow="ellipsis", no_wrap=True)
    table.add_column("status", no_wrap=True, min_width=max(len(r[3]) for r in rows))
    table.add_column("v", justify="right", no_wrap=True)
    table.add_column("base", no_wrap=True, min_width=8)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _download(
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
    with _client(registry, token) as agora, _progress_bar(f"download {expert_id}") as bar:
        path = agora.download(expert_id, version=version, dest=out, progress=bar)
    typer.echo(str(path))


def _search(
    *,
    texts: Annotated[list[str], typer.Argument(help="Sample text(s) of your domain.")],
    base: Annotated[str, typer.Option("--base", help="Base model revision.")],
    k: Annotated[int, typer.Option("-k", min=1, max=64, help="How many experts.")] = 4,
    temperature: Annotated[
        float, typer.Option("--temperature", "-T", help="T of the weights softmax(-d^2/T).")
    ] = DEFAULT_TEMPERATURE,
    as_json: Annotated[bool, typer.Option("--json", help="The response as JSON.")] = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Find the experts that fit sample text, with their ensemble weights."""
    with _client(registry, token) as agora:
        found = agora.search(texts, base, k=k, temperature=temperature)
    if as_json:
        typer.echo(json.dumps(found.model_dump(mode="json"), sort_keys=True))
        return
    if not found.results:
        typer.echo("no active expert of this base revision yet")
        return
    table = Table(caption=f"embedder {found.embedder}")
    table.add_column("expert", no_wrap=True, min_width=max(len(r.expert_id) for r in found.results))
    table.add_column("v", justify="right", no_wrap=True)
    table.add_column("weight", justify="right", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("name", overflow="ellipsis", no_wrap=True)
    table.add_column("domain", overflow="ellipsis", no_wrap=True)
    for r in found.results:
        table.add_row(
            r.expert_id,
            str(r.version),
            f"{r.weight:.3f}",
            f"{r.score:.3f}",
            r.name or "",
            _shorten(r.domain or "", 40),
        )
    Console().print(table)


def _init(
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
    base: Annotated[str, typer.Option("--base", help="Base model revision.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the starting weights.")],
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Start a new expert from the existing one closest to your data (its weights to --out,
    for `agora expert train --init-from`)."""
    with _client(registry, token) as agora:
        nearest = agora.nearest_expert(from_nearest, base)
        typer.echo(
            f"nearest expert {nearest.expert_id} v{nearest.version} "
            f"({nearest.name or 'unnamed'}; similarity {nearest.score:.3f})"
        )
        with _progress_bar(f"download {nearest.expert_id}") as bar:
            path = agora.download(
                nearest.expert_id, version=nearest.version, dest=out, progress=bar
            )
    typer.echo(str(path))


def _moderate(action: str) -> Callable[..., None]:
    def command(
        *,
        expert_id: Annotated[str, typer.Argument(help="Expert id (ex_...).")],
        reason: Annotated[str, typer.Option("--reason", help="Why (required; recorded).")],
        registry: RegistryOption = DEFAULT_URL,
        token: TokenOption = None,
    ) -> None:
        with _client(registry, token) as agora:
            done = (agora.disable_expert if action == "disable" else agora.enable_expert)(
                expert_id, reason
            )
        typer.echo(f"{done.expert_id} is {done.status} ({done.action} by {done.actor})")

    command.__doc__ = (
        "Disable an expert (moderator): gone from search and downloads at once."
        if action == "disable"
        else "Re-enable a disabled expert (moderator)."
    )
    return command


def _base_upload(
    *,
    bundle: Annotated[
        Path,
        typer.Argument(
            exists=True, file_okay=False, help="Base bundle directory (agora base init/train)."
        ),
    ],
    name: Annotated[str | None, typer.Option("--name", help="A display name.")] = None,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Upload a base bundle (config.json, tokenizer.json, model.safetensors; admin).

    Prints the revision as the last line: identical files always give the same revision.
    """
    files = [bundle / "config.json", bundle / "tokenizer.json", bundle / "model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        _err.print(f"[bold red]error[/] [bundle_incomplete] {bundle} lacks {', '.join(missing)}")
        raise typer.Exit(1)
    with _client(registry, token) as agora, _progress_bar(f"upload {bundle.name}") as bar:
        base = agora.upload_base_model(*files, name=name, progress=bar)
    typer.echo(base.revision)


def _base_download(
    *,
    revision: Annotated[str, typer.Argument(help="Base revision (sha256 hex).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the bundle into.")],
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Download a base bundle (sha256-verified, cached) into a directory."""
    with _client(registry, token) as agora, _progress_bar(f"download {revision[:12]}") as bar:
        target = agora.download_base_model(revision, out, progress=bar)
    typer.echo(str(target))


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def register(root: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add the SDK's commands to the ``agora`` CLI (see agora/cli.py)."""
    expert = groups["expert"]
    commands: dict[str, Callable[..., None]] = {
        "submit": _submit,
        "list": _list,
        "download": _download,
        "init": _init,
        "disable": _moderate("disable"),
        "enable": _moderate("enable"),
    }
    for name, command in commands.items():
        expert.command(name)(command)
    root.command("search")(_search)
    groups["base"].command("upload")(_base_upload)
    groups["base"].command("download")(_base_download)
