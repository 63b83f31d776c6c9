"""``agora search``: the registry's experts that fit sample text, with ensemble weights."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from agora.remote import (
    DEFAULT_URL,
    BaseRevisionOption,
    RegistryOption,
    TokenOption,
    client,
    fitted_table,
    resolve_base,
    shorten,
    stdout_console,
)


def search(
    *,
    texts: Annotated[list[str], typer.Argument(help="Sample text(s) of your domain.")],
    base: BaseRevisionOption = None,
    k: Annotated[int, typer.Option("-k", min=1, max=64, help="How many experts.")] = 4,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            "-T",
            help="T of the weights softmax(-d^2/T) (default: the SDK's).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The response as JSON.")] = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Find the experts that fit sample text, with their ensemble weights."""
    options: dict[str, Any] = {"k": k}
    if temperature is not None:
        options["temperature"] = temperature
    with client(registry, token) as agora:
        found = agora.search(texts, resolve_base(agora, base), **options)
    if as_json:
        typer.echo(json.dumps(found.model_dump(mode="json"), sort_keys=True))
        return
    if not found.results:
        typer.echo("no active expert of this base revision yet")
        return
    rows = [
        (
            r.expert_id,
            str(r.version),
            f"{r.weight:.3f}",
            f"{r.score:.3f}",
            r.name or "",
            shorten(r.domain or "", 40),
        )
        for r in found.results
    ]
    # The id and the numbers never shrink: in a narrow terminal name and domain give way.
    console = stdout_console()
    headers = ("expert", "v", "weight", "score", "name", "domain")
    table = fitted_table(
        console,
        headers,
        rows,
        shrink=("name", "domain"),
        right=("v", "weight", "score"),
        caption=f"embedder {found.embedder}",
    )
    console.print(table)
