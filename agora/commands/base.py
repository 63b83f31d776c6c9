"""``agora base``: create and train a base bundle here (``init``, ``train``); move one to
and from a registry (``upload``, ``download``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from agora.commands import train
from agora.common import LOCAL_PANEL, REGISTRY_PANEL
from agora.remote import (
    DEFAULT_URL,
    RegistryOption,
    TokenOption,
    client,
    err,
    progress_bar,
)

BUNDLE_FILES = ("config.json", "tokenizer.json", "model.safetensors")


def upload(
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
    files = [bundle / file for file in BUNDLE_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        err.print(f"[bold red]error[/] [bundle_incomplete] {bundle} lacks {', '.join(missing)}")
        raise typer.Exit(1)
    with client(registry, token) as agora, progress_bar(f"upload {bundle.name}") as bar:
        base = agora.upload_base_model(*files, name=name, progress=bar)
    typer.echo(base.revision)


def download(
    *,
    revision: Annotated[str, typer.Argument(help="Base revision (sha256 hex).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the bundle into.")],
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Download a base bundle (sha256-verified, cached) into a directory."""
    with client(registry, token) as agora, progress_bar(f"download {revision[:12]}") as bar:
        target = agora.download_base_model(revision, out, progress=bar)
    typer.echo(str(target))


def list_bases(
    *,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """List the registry's base revisions (the values --base takes), one per line."""
    with client(registry, token) as agora:
        bases = agora.list_base_models()
    if as_json:
        for found in bases:
            typer.echo(json.dumps(found.model_dump(mode="json"), sort_keys=True))
        return
    if not bases:
        typer.echo("no base model yet (an admin uploads one: agora base upload DIR)")
    for found in bases:
        typer.echo(f"{found.revision}  {found.name or ''}".rstrip())


def group() -> typer.Typer:
    app = typer.Typer(
        name="base",
        help="Create and train base model bundles; upload and download them.",
        no_args_is_help=True,
    )
    app.command("init", rich_help_panel=LOCAL_PANEL)(train.base_init)
    app.command("train", rich_help_panel=LOCAL_PANEL)(train.base_train)
    app.command("list", rich_help_panel=REGISTRY_PANEL)(list_bases)
    app.command("upload", rich_help_panel=REGISTRY_PANEL)(upload)
    app.command("download", rich_help_panel=REGISTRY_PANEL)(download)
    return app
