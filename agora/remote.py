"""The registry side of the command line: the SDK client, its errors as one line, progress
bars, the base revision a command works on, and the text inputs commands send.

The registry URL and token come from ``--registry`` / ``--token`` or the environment
(``AGORA_REGISTRY_URL``, ``AGORA_TOKEN``). Errors print as one line with their code (then
one line per field the registry named) and exit 1, so scripts can switch on them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

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

from registry.client import Agora, AgoraError, Job, JobFailed, ProgressCallback

JobCallback = Callable[[Job], None]

DEFAULT_URL = "http://127.0.0.1:8000"
# How many of a refusal's field problems are printed (the rest are counted).
MAX_FIELD_LINES = 20
# A text column that gives way to the numbers still shows this many characters; text
# columns that would share less than MIN_SHARED_WIDTH each are dropped, least wanted first.
MIN_TEXT_WIDTH = 4
MIN_SHARED_WIDTH = 12

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
BaseRevisionOption = Annotated[
    str | None,
    typer.Option(
        "--base",
        help="Base model revision (default: the registry's only base; with several, a usage "
        "error lists them).",
    ),
]

err = Console(stderr=True)


@contextmanager
def client(registry: str, token: str | None) -> Iterator[Agora]:
    """An SDK client whose errors end the command with one line and exit status 1."""
    try:
        with Agora(registry, token=token) as agora:
            yield agora
    except TimeoutError as exc:
        err.print(f"[bold red]error[/] [timeout] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except AgoraError as exc:
        if isinstance(exc, JobFailed) and isinstance(exc.job, Job):
            where = f"job {exc.job.id} {exc.job.status} after {exc.job.attempts} attempt(s)"
        else:
            where = f"HTTP {exc.status}" if exc.status is not None else "no response"
        line = f"{exc.detail} ({where})"
        err.print(f"[bold red]error[/] {escape(f'[{exc.code}]')} {escape(line)}", soft_wrap=True)
        for text in field_lines(exc.errors):
            err.print(f"  - {text}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def field_lines(errors: list[dict[str, Any]]) -> list[str]:
    """One line per field problem of a problem+json body, each with the field's path."""
    lines = [describe_field_error(e) for e in errors[:MAX_FIELD_LINES]]
    if len(errors) > MAX_FIELD_LINES:
        lines.append(f"... and {len(errors) - MAX_FIELD_LINES} more")
    return lines


def describe_field_error(problem: dict[str, Any] | Any) -> str:
    """``where: what``. The registry names the place as ``path`` (a datasheet's
    ``$.contact``), ``tensor`` (a weights file), ``field`` or ``pointer``; pydantic as
    ``loc`` (a list)."""
    if not isinstance(problem, dict):
        return str(problem)
    where: Any = next(
        (problem[k] for k in ("path", "tensor", "field", "pointer", "loc") if problem.get(k)),
        "",
    )
    if isinstance(where, list | tuple):
        where = ".".join(str(part) for part in where)
    message = next(
        (problem[k] for k in ("message", "msg", "detail") if problem.get(k)),
        json.dumps(problem, sort_keys=True),
    )
    return f"{where}: {message}" if where else str(message)


def resolve_base(agora: Agora, base: str | None) -> str:
    """``--base`` as given, else the registry's only base; several (or none) is a usage
    error that lists them, the same for every command that takes a revision."""
    if base:
        return base
    bases = agora.list_base_models()
    if len(bases) == 1:
        return bases[0].revision
    if not bases:
        raise typer.BadParameter(
            "the registry has no base model yet (an admin uploads one: agora base upload DIR)",
            param_hint="--base",
        )
    listed = "; ".join(f"{b.revision}" + (f" ({b.name})" if b.name else "") for b in bases)
    raise typer.BadParameter(
        f"the registry has {len(bases)} base models, name one (agora base list): {listed}",
        param_hint="--base",
    )


@contextmanager
def progress_bar(description: str) -> Iterator[ProgressCallback]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = progress.add_task(description, total=None)

    def update(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        yield update


@contextmanager
def job_status(description: str) -> Iterator[JobCallback]:
    """A live status line for a job: spinner, status, the worker's progress, elapsed time."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
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


def read_passages(source: str, param_hint: str = "--texts") -> list[str]:
    """The blank-line separated paragraphs of a text file, or of stdin for ``-``."""
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise typer.BadParameter(f"{source} is not a file", param_hint=param_hint)
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


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def stdout_console() -> Console:
    """Tables go to stdout at the terminal's width (``COLUMNS`` when set)."""
    return Console()


def fitted_table(
    console: Console,
    headers: tuple[str, ...],
    rows: Sequence[tuple[str, ...]],
    *,
    shrink: tuple[str, ...],
    right: tuple[str, ...] = (),
    caption: str | None = None,
) -> Table:
    """A table whose columns keep their full width except those in ``shrink`` (free text:
    names, domains; most wanted first), which share what the console's width leaves and
    end in an ellipsis. Where they would each get fewer than ``MIN_SHARED_WIDTH``
    characters, the last of them is left out (``--json`` has every field).

    Rich alone shrinks every no-wrap column evenly when a table is too wide, which at 80
    columns squeezed the numbers to nothing; here the widths are decided up front.
    """
    natural = {h: max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)}
    kept = list(shrink)

    def room_for_text() -> int:
        shown = [h for h in headers if h not in shrink or h in kept]
        # Each column has one space of padding on either side, and n + 1 rules around them.
        fixed = sum(natural[h] for h in shown if h not in shrink)
        return console.width - fixed - (3 * len(shown) + 1)

    while len(kept) > 1 and room_for_text() // len(kept) < MIN_SHARED_WIDTH:
        kept.pop()
    room = room_for_text()
    widths: dict[str, int] = {}
    for n, header in enumerate(sorted(kept, key=lambda h: natural[h])):
        share = max(MIN_TEXT_WIDTH, room // (len(kept) - n))
        widths[header] = min(natural[header], share)
        room -= widths[header]
    table = Table(caption=caption)
    shown = [i for i, h in enumerate(headers) if h not in shrink or h in kept]
    for i in shown:
        header = headers[i]
        justify: Literal["left", "right"] = "right" if header in right else "left"
        if header in shrink:
            table.add_column(
                header, justify=justify, no_wrap=True, overflow="ellipsis", width=widths[header]
            )
        else:
            table.add_column(header, justify=justify, no_wrap=True, min_width=natural[header])
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table
