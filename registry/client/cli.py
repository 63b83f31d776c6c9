"""``agora expert submit|list|download|init``, ``agora search``, ``agora expert
disable|enable``, ``agora compose``, ``agora evaluate`` and ``agora job get|list``: the SDK
on the command line.

The registry URL and token come from ``--registry`` / ``--token`` or the environment
(``AGORA_REGISTRY_URL``, ``AGORA_TOKEN``). Errors print as one line with their code and
exit non-zero, so scripts can switch on them.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
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
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from registry.client.client import DEFAULT_TEMPERATURE, DEFAULT_URL, Agora, ProgressCallback
from registry.client.errors import AgoraError, CompositionWarning, JobFailed
from registry.client.jobs import JobCallback
from registry.client.models import Composition, Job
from registry.contracts import METHOD_SPECS, METHODS, params_summary, relative_change

COMPOSE_METHODS = METHODS
# The methods with the base as a path (ensemble, and distill's teacher): --with-base.
BASE_PATH_METHODS = tuple(
    name for name, spec in METHOD_SPECS.items() if any(p.name == "with_base" for p in spec.params)
)

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
    except TimeoutError as exc:
        _err.print(f"[bold red]error[/] [timeout] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except AgoraError as exc:
        if isinstance(exc, JobFailed) and isinstance(exc.job, Job):
            where = f"job {exc.job.id} {exc.job.status} after {exc.job.attempts} attempt(s)"
        else:
            where = f"HTTP {exc.status}" if exc.status is not None else "no response"
        line = f"{exc.detail} ({where})"
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


@contextmanager
def _job_status(description: str) -> Iterator[JobCallback]:
    """A live status line for a job: spinner, status, the worker's progress, elapsed time."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_err,
        transient=True,
    )
    task = progress.add_task(description, total=None)

    def update(job: Job) -> None:
        report = job.progress or {}
        done, total = report.get("done"), report.get("total")
        message = report.get("message")
        attempt = f" (attempt {job.attempts})" if job.attempts > 1 else ""
        text = f"{description}: {job.status}{attempt}" + (f" - {message}" if message else "")
        progress.update(
            task,
            description=escape(text),
            completed=done if isinstance(done, int | float) else 0,
            total=total if isinstance(total, int | float) and total > 0 else None,
        )

    with progress:
        yield update


def read_passages(source: str) -> list[str]:
    """The blank-line separated paragraphs of a text file, or of stdin for ``-``."""
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise typer.BadParameter(f"{source} is not a file", param_hint="--texts")
        text = path.read_text(encoding="utf-8", errors="replace")
    return [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()]


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value that parses as JSON (50, 0.2, true) is taken as such,
    anything else as a string (``merge=ties``)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="--param")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return params


def _split_list(values: list[str] | None) -> list[str]:
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def _compose(
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
        str, typer.Option("--method", help=f"One of {', '.join(COMPOSE_METHODS)}.")
    ] = "ensemble",
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
    base: Annotated[
        str | None,
        typer.Option("--base", help="Base revision (default: the registry's only base)."),
    ] = None,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help=f"Method parameter key=value (repeatable), e.g. steps=50. {params_summary()}.",
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Comma separated weights, one per expert."),
    ] = None,
    with_base: Annotated[
        bool | None,
        typer.Option(
            "--with-base/--without-base",
            help="ensemble, distill: the unmodified base is one more path of the ensemble, "
            "the null expert it falls back on where no expert fits (default: with; its "
            "weight: --param base_weight=W).",
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
    if method not in COMPOSE_METHODS:
        raise typer.BadParameter(
            f"{method!r} is not one of {', '.join(COMPOSE_METHODS)}", param_hint="--method"
        )
    if with_base is not None and method not in BASE_PATH_METHODS:
        flag = "--with-base" if with_base else "--without-base"
        raise typer.BadParameter(
            f"only with --method {' or '.join(BASE_PATH_METHODS)}", param_hint=flag
        )
    passages = read_passages(texts) if texts is not None else None
    if texts is not None and not passages:
        raise typer.BadParameter(f"{texts} holds no text", param_hint="--texts")
    expert_ids = _split_list(experts) or None
    if passages is None and expert_ids is None:
        raise typer.BadParameter("give --texts, --experts, or both")
    try:
        weight_values = [float(w) for w in _split_list([weights])] if weights else None
    except ValueError:
        raise typer.BadParameter(
            f"{weights!r} is not a list of numbers", param_hint="--weights"
        ) from None
    method_params = parse_params(params or [])
    if with_base is not None:
        if method_params.get("with_base", with_base) != with_base:
            raise typer.BadParameter(
                "contradicts --param with_base=...", param_hint="--with-base/--without-base"
            )
        method_params["with_base"] = with_base
    with _client(registry, token) as agora:
        with warnings.catch_warnings():
            # Printed below, once, from the handle; not again by the warnings module.
            warnings.simplefilter("ignore", CompositionWarning)
            handle = agora.compose(
                method,
                base_revision=base,
                experts=expert_ids,
                texts=passages,
                k=k,
                weights=weight_values,
                params=method_params,
            )
        for caution in handle.warnings:
            _err.print(
                f"[bold yellow]warning:[/] {escape(f'[{caution.code}]')} {escape(caution.detail)}",
                soft_wrap=True,
            )
        _err.print(
            f"queued job {handle.job_id} for composition {handle.composition_id}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        with _job_status(f"{method} {handle.composition_id}") as show:
            composition = handle.wait(timeout=timeout, progress=show)
        job = handle.job
        with _progress_bar("download") as bar:
            agora.download_composition(composition, out, progress=bar)
    if as_json:
        typer.echo(json.dumps(composition.model_dump(mode="json"), sort_keys=True))
        return
    _print_composition(composition, job, out)


def _print_composition(composition: Composition, job: Job | None, out: Path) -> None:
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


def _evaluate(
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
        sets[name] = read_passages(source)
        if not sets[name]:
            raise typer.BadParameter(f"{source} holds no text", param_hint="TEXT_SETS")
    with _client(registry, token) as agora:
        handle = agora.evaluate(
            sets, expert_id=expert_id, version=version, composition_id=composition_id
        )
        with _job_status(f"evaluate {expert_id or composition_id}") as show:
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


def _job_get(
    *,
    job_id: Annotated[str, typer.Argument(help="Job id (job_...).")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job ends.")] = False,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """A job's status, progress, result or error, as JSON."""
    with _client(registry, token) as agora:
        handle = agora.job(job_id)
        if wait:
            with _job_status(job_id) as show:
                try:
                    job = handle.wait(progress=show)
                except JobFailed as exc:
                    job = exc.job if isinstance(exc.job, Job) else handle.refresh()
        else:
            job = handle.refresh()
    typer.echo(json.dumps(job.model_dump(mode="json", exclude_unset=True), indent=2))
    if job.status in ("failed", "dead"):
        raise typer.Exit(1)


def _job_list(
    *,
    status: Annotated[
        str | None, typer.Option("--status", help="queued, leased, succeeded, failed, dead.")
    ] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="e.g. compose.ensemble.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many.")] = None,
    registry: RegistryOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Jobs by status and kind, one JSON object per line (moderators and admins)."""
    with _client(registry, token) as agora:
        jobs = agora.list_jobs(status=status, kind=kind, limit=limit)
    for job in jobs:
        typer.echo(json.dumps(job.model_dump(mode="json", exclude_unset=True), sort_keys=True))


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
    root.command("compose")(_compose)
    root.command("evaluate")(_evaluate)
    job = typer.Typer(name="job", help="Jobs computed by workers.", no_args_is_help=True)
    job.command("get")(_job_get)
    job.command("list")(_job_list)
    root.add_typer(job, name="job")
