"""``agora evaluate``: bits per byte of a registry's expert or composition on named text
sets, computed by a worker (``agora local eval`` computes on local files instead)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from agora.methods import relative_change
from agora.remote import (
    DEFAULT_URL,
    RegistryOption,
    TokenOption,
    client,
    job_status,
    read_passages,
)


def evaluate(
    *,
    text_sets: Annotated[
        list[str],
        typer.Argument(
            help="NAME=FILE pairs: each file's blank-line separated paragraphs are one set."
        ),
    ],
    expert_id: Annotated[
        str | None, typer.Option("--expert", help="Evaluate this expert (base + it).")
    ] = None,
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="Expert version (default: latest).")
    ] = None,
    composition_id: Annotated[
        str | None, typer.Option("--composition", help="Evaluate this composition.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0, help="Seconds to wait (default: no limit).")
    ] = None,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Bits per byte of an expert or a composition on named text sets (computed by a worker)."""
    if (expert_id is None) == (composition_id is None):
        raise typer.BadParameter("give exactly one of --expert and --composition")
    sets: dict[str, list[str]] = {}
    for pair in text_sets:
        name, sep, source = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{pair!r} is not NAME=FILE", param_hint="TEXT_SETS")
        sets[name] = read_passages(source, param_hint="TEXT_SETS")
        if not sets[name]:
            raise typer.BadParameter(f"{source} holds no text", param_hint="TEXT_SETS")
    with client(registry, token) as agora:
        handle = agora.evaluate(
            sets, expert_id=expert_id, version=version, composition_id=composition_id
        )
        with job_status(f"evaluate {expert_id or composition_id}") as show:
            scores = handle.wait(timeout=timeout, progress=show)
    typer.echo(f"job {handle.job_id}")
    table = Table()
    table.add_column("text set")
    table.add_column("bits/byte", justify="right", no_wrap=True)
    table.add_column("base", justify="right", no_wrap=True)
    table.add_column("vs base", justify="right", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    for name, score in scores.items():
        base_bpb = score.base_bits_per_byte
        delta = score.delta_vs_base
        if delta is None and base_bpb is not None:  # a worker that did not say
            delta = relative_change(score.bits_per_byte, base_bpb)
        table.add_row(
            name,
            f"{score.bits_per_byte:.4f}",
            f"{base_bpb:.4f}" if base_bpb is not None else "-",
            f"{delta:+.2%}" if delta is not None else "-",
            str(score.bytes) if score.bytes is not None else "-",
        )
    Console(width=100).print(table)
