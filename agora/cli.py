"""The ``agora`` command: every command group assembled here, in one place.

Each group lives in its own module under agora/commands/. ``agora --help`` sorts them
into panels by where they compute: on a registry over HTTP, on local files, or running
a registry. Importing this module (and ``agora --help``) needs only the core
dependencies (typer, rich, httpx, pydantic): torch, FastAPI and SQLAlchemy are imported
inside the commands that use them, which name the extra to install when it is missing.

Old names kept for one release, hidden from the help, each printing a deprecation line:
``agora eval`` (now ``agora local eval``), ``agora expert merge|distill|matrix`` (now
``agora local ...``), and ``--base DIR`` of the local commands (now ``--base-dir DIR``).
"""

from __future__ import annotations

import typer

from agora.commands import (
    admin,
    base,
    compose,
    data,
    db,
    demo,
    evaluate,
    expert,
    job,
    local,
    report,
    search,
    serve,
    worker,
)
from agora.common import (
    ARTIFACTS_PANEL,
    LOCAL_PANEL,
    REGISTRY_PANEL,
    SERVER_PANEL,
    deprecated_command,
)
from agora.modeling import DataCommand

HELP = "Agora: a registry and compute service for a decentralized, modular language model."


def _version() -> None:
    """Print the installed Agora version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("agora"))


def build_app() -> typer.Typer:
    root = typer.Typer(
        name="agora", help=HELP, no_args_is_help=True, pretty_exceptions_show_locals=False
    )

    @root.callback()
    def _root() -> None:
        """Agora: a registry and compute service for a decentralized, modular language model."""

    root.command("demo", rich_help_panel="Start here")(demo.demo)
    root.command("search", rich_help_panel=REGISTRY_PANEL)(search.search)
    root.command("compose", rich_help_panel=REGISTRY_PANEL)(compose.compose)
    root.command("evaluate", rich_help_panel=REGISTRY_PANEL)(evaluate.evaluate)
    root.add_typer(job.group(), name="job", rich_help_panel=REGISTRY_PANEL)
    root.add_typer(report.group(), name="report", rich_help_panel=REGISTRY_PANEL)

    root.add_typer(local.group(), name="local", rich_help_panel=LOCAL_PANEL)
    root.add_typer(data.group(), name="data", rich_help_panel=LOCAL_PANEL)

    root.add_typer(expert.group(), name="expert", rich_help_panel=ARTIFACTS_PANEL)
    root.add_typer(base.group(), name="base", rich_help_panel=ARTIFACTS_PANEL)

    root.command("serve", rich_help_panel=SERVER_PANEL)(serve.serve)
    root.command("worker", rich_help_panel=SERVER_PANEL)(worker.worker)
    root.add_typer(db.group(), name="db", rich_help_panel=SERVER_PANEL)
    root.add_typer(admin.group(), name="admin", rich_help_panel=SERVER_PANEL)

    root.command("version")(_version)
    root.command("eval", hidden=True, cls=DataCommand)(
        deprecated_command(local.eval_command, "eval", "local eval")
    )
    return root


def main() -> None:
    build_app()()


if __name__ == "__main__":
    main()
