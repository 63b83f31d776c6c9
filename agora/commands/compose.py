"""``agora compose``: a composition computed by a registry's worker, downloaded into a
directory that loads offline (``registry.client.composed.load_composed_dir(DIR)``).

The method choices and the parameters in ``--help`` come from the spec table
(agora/methods.py); the registry checks the same specs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agora.common import WeightsOption, parse_weights, split_list
from agora.methods import BASE_PATH_METHODS, DEFAULT_COMPOSE_METHOD, METHODS, params_summary
from agora.remote import (
    DEFAULT_URL,
    BaseRevisionOption,
    RegistryOption,
    TokenOption,
    client,
    err,
    job_status,
    parse_params,
    progress_bar,
    read_passages,
    resolve_base,
)
from registry.client import Composition, CompositionWarning, Job


def compose(
    *,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            file_okay=False,
            help="Directory that receives manifest.json, base/ and experts/ (usable offline).",
        ),
    ],
    method: Annotated[
        str, typer.Option("--method", help=f"One of {', '.join(METHODS)}.")
    ] = DEFAULT_COMPOSE_METHOD,
    texts: Annotated[
        str | None,
        typer.Option(
            "--texts",
            help="Text file of your domain, one passage per blank-line separated paragraph "
            "('-' reads stdin). Without --experts the experts are the top k by retrieval.",
        ),
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=64, help="How many experts.")] = 4,
    experts: Annotated[
        list[str] | None,
        typer.Option(
            "--experts",
            "--expert",
            help="Expert id (or id@version); repeat or separate with commas.",
        ),
    ] = None,
    base: BaseRevisionOption = None,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help=f"Method parameter key=value (repeatable), e.g. steps=50. {params_summary()}.",
        ),
    ] = None,
    weights: WeightsOption = None,
    with_base: Annotated[
        bool | None,
        typer.Option(
            "--with-base/--without-base",
            help=f"{', '.join(BASE_PATH_METHODS)}: the unmodified base is one more path of "
            "the ensemble, the null expert it falls back on where no expert fits (default: "
            "with; its weight: --param base_weight=W).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0, help="Seconds to wait (default: no limit).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the composition as JSON instead.")
    ] = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Compose experts into a model (computed by a worker), then download it into --out.

    Prints the job and composition ids, the experts with their weights and the metrics;
    the registry's cautions about the method (average) go to stderr as "warning: ...".

    Load the directory offline with registry.client.composed.load_composed_dir(DIR).
    """
    if method not in METHODS:
        raise typer.BadParameter(
            f"{method!r} is not one of {', '.join(METHODS)}", param_hint="--method"
        )
    if with_base is not None and method not in BASE_PATH_METHODS:
        flag = "--with-base" if with_base else "--without-base"
        raise typer.BadParameter(
            f"only with --method {' or '.join(BASE_PATH_METHODS)}", param_hint=flag
        )
    passages = read_passages(texts) if texts is not None else None
    if texts is not None and not passages:
        raise typer.BadParameter(f"{texts} holds no text", param_hint="--texts")
    expert_ids = split_list(experts) or None
    if passages is None and expert_ids is None:
        raise typer.BadParameter("give --texts, --experts, or both")
    weight_values = parse_weights(weights)
    method_params = parse_params(params or [])
    if with_base is not None:
        if method_params.get("with_base", with_base) != with_base:
            raise typer.BadParameter(
                "contradicts --param with_base=...", param_hint="--with-base/--without-base"
            )
        method_params["with_base"] = with_base
    with client(registry, token) as agora:
        revision = resolve_base(agora, base)
        with warnings.catch_warnings():
            # Printed below, once, from the handle; not again by the warnings module.
            warnings.simplefilter("ignore", CompositionWarning)
            handle = agora.compose(
                method,
                base_revision=revision,
                experts=expert_ids,
                texts=passages,
                k=k,
                weights=weight_values,
                params=method_params,
            )
        for caution in handle.warnings:
            err.print(
                f"[bold yellow]warning:[/] {escape(f'[{caution.code}]')} {escape(caution.detail)}",
                soft_wrap=True,
            )
        err.print(
            f"queued job {handle.job_id} for composition {handle.composition_id}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        with job_status(f"{method} {handle.composition_id}") as show:
            composition = handle.wait(timeout=timeout, progress=show)
        job = handle.job
        with progress_bar("download") as bar:
            agora.download_composition(composition, out, progress=bar)
    if as_json:
        typer.echo(json.dumps(composition.model_dump(mode="json"), sort_keys=True))
        return
    print_composition(composition, job, out)


def print_composition(composition: Composition, job: Job | None, out: Path) -> None:
    manifest = composition.manifest
    typer.echo(f"job          {composition.job_id}")
    typer.echo(f"composition  {composition.id} ({composition.method}, {composition.status})")
    typer.echo(f"base         {composition.base_revision}")
    if job is not None and job.attempts > 1:
        typer.echo(f"attempts     {job.attempts}")
    if manifest is None:
        return
    table = Table(title="experts")
    table.add_column("expert", no_wrap=True)
    table.add_column("v", justify="right", no_wrap=True)
    table.add_column("weight", justify="right", no_wrap=True)
    table.add_column("digest", no_wrap=True)
    for ref in manifest.experts:
        weight = f"{ref.weight:.3f}" if ref.weight is not None else "-"
        table.add_row(ref.id, str(ref.version), weight, ref.digest[:19])
    if manifest.with_base:  # the null expert: the base alone, one more path
        weight = f"{manifest.base_weight:.3f}" if manifest.base_weight is not None else "mean"
        table.add_row("base (no expert)", "-", weight, manifest.base_revision[:19])
    Console(width=100).print(table)
    if manifest.output is not None:
        typer.echo(f"new expert   {manifest.output.id} v{manifest.output.version}")
    metrics = manifest.metrics or {}
    for name, value in sorted(metrics.items()):
        counted = name in ("bytes", "tokens") and isinstance(value, int | float)
        shown = (
            str(int(value)) if counted else f"{value:.4f}" if isinstance(value, float) else value
        )
        typer.echo(f"{name:<20} {shown}")
    bpb, base_bpb = metrics.get("bits_per_byte"), metrics.get("base_bits_per_byte")
    if isinstance(bpb, int | float) and isinstance(base_bpb, int | float):
        typer.echo(f"{'vs base':<20} {bpb - base_bpb:+.4f} bits/byte")
    typer.echo(f"written to   {out}")
