"""``agora demo``: train a base and experts on this machine's own text, publish them to a
registry, compose them through the job queue, print what each composition does to each
domain, then disable one expert and print the proof of forgetting (docs/demo.md).

Progress goes to stderr; the table and the forgetting check (or ``--json``) to stdout.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Annotated

import typer

from agora.common import echo_err, require_extra
from agora.modeling import PRESET_HELP, ShowProgress

DEFAULT_DIR = Path("agora-demo")


def _fail(message: str) -> typer.Exit:
    echo_err(f"error: {message}")
    return typer.Exit(2)


def demo(
    *,
    directory: Annotated[
        Path,
        typer.Option(
            "--dir", help="Where the demo keeps its cache, datasheets, registry and results."
        ),
    ] = DEFAULT_DIR,
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            help="Use this registry (needs an admin --token and a worker) instead of the "
            "demo's own.",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", envvar="AGORA_TOKEN", help="Admin token for --registry.", show_default=False
        ),
    ] = None,
    preset: Annotated[str, typer.Option("--preset", help=PRESET_HELP)] = "small",
    base_steps: Annotated[int, typer.Option("--base-steps", min=1)] = 400,
    expert_steps: Annotated[int, typer.Option("--expert-steps", min=1)] = 80,
    distill_steps: Annotated[
        int, typer.Option("--distill-steps", min=1, help="Steps of each distillation job.")
    ] = 30,
    clusters: Annotated[
        int, typer.Option("--clusters", min=0, max=8, help="Discovered clusters (c-BTM).")
    ] = 2,
    max_bytes_per_domain: Annotated[
        int, typer.Option("--max-bytes-per-domain", min=16 * 1024, help="Corpus text per domain.")
    ] = 128 * 1024,
    disable: Annotated[
        str | None,
        typer.Option(
            "--disable",
            help="The named domain whose expert is disabled for the forgetting check "
            "(default: licenses; 'none' skips it).",
            show_default=False,
        ),
    ] = None,
    keep_disabled: Annotated[
        bool, typer.Option("--keep-disabled", help="Leave that expert disabled afterwards.")
    ] = False,
    forget_again: Annotated[
        bool,
        typer.Option(
            "--forget-again",
            help="Disable and measure again even when an earlier run measured the same "
            "compositions.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="The results as JSON.")] = False,
    progress: ShowProgress = True,
) -> None:
    """Train, publish, compose and forget on this machine's own text; print the results."""
    require_extra("model", "demo")
    from agora import demo as run_demo
    from agora.demo import report, training

    if preset not in {"tiny", "small"}:
        raise _fail(f"--preset must be tiny or small for the demo (CPU), not {preset!r}")
    if registry is not None:
        if not registry.startswith(("http://", "https://")):
            raise _fail(
                f"--registry must be an http(s) URL, like http://127.0.0.1:8000; got {registry!r}"
            )
        if not token:
            raise _fail("--registry needs an admin token: --token or AGORA_TOKEN")
    named = tuple(training.available_domains(training.NAMED_DOMAINS))
    unlabeled = tuple(training.available_domains(training.UNLABELED_DOMAINS))
    if len(named) + len(unlabeled) < 2:
        raise _fail(
            f"this machine has text for only {[*named, *unlabeled]}: the demo needs two of "
            f"{', '.join((*training.NAMED_DOMAINS, *training.UNLABELED_DOMAINS))}"
        )
    if not named:
        raise _fail(f"this machine has no text for {' or '.join(training.NAMED_DOMAINS)}")
    chosen = named[0] if disable is None else (None if disable == "none" else disable)
    if chosen is not None and chosen not in named:
        raise _fail(f"--disable must be one of {', '.join(named)} or none, not {disable!r}")
    if directory.exists() and not directory.is_dir():
        raise _fail(f"--dir {directory} is a file, not a directory")
    plan = training.Plan(
        preset=preset,
        named=named,
        unlabeled=unlabeled,
        clusters=clusters,
        max_bytes_per_domain=max_bytes_per_domain,
        base_steps=base_steps,
        expert_steps=expert_steps,
        seed=seed,
    )
    options = run_demo.Options(
        root=directory,
        registry=registry.rstrip("/") if registry else None,
        token=token,
        disable=chosen,
        restore=not keep_disabled,
        forget_again=forget_again,
        distill_steps=distill_steps,
        progress=progress,
    )
    from registry.client.errors import AgoraError

    try:
        outcome, timings = run_demo.run(plan, options, echo_err)
    except training.DemoError as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        echo_err(
            f"interrupted: everything trained or computed so far is kept in {directory}; "
            "the same command goes on from there"
        )
        raise typer.Exit(130) from None
    except AgoraError as exc:  # the registry refused a step: one line, as every command
        where = f"HTTP {exc.status}" if exc.status is not None else "no response"
        echo_err(f"error: [{exc.code}] {exc.detail} ({where})")
        raise typer.Exit(1) from None
    result = report.as_json(outcome, timings)
    (directory / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
        return
    typer.echo(report.table(outcome))
    for note in outcome.notes:
        typer.echo("")
        typer.echo(textwrap.fill(f"note: {note}", width=80, subsequent_indent="  "))
    if outcome.forgetting is not None:
        typer.echo("")
        typer.echo(report.forgetting_text(outcome))
    typer.echo("")
    typer.echo(
        f"Took {timings['total']:.0f} s (training {timings['training']:.0f} s); results in "
        f"{directory / 'results.json'}."
    )
