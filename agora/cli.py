"""Root of the ``agora`` command line.

Each package contributes its commands through a ``register(root, groups)`` function in a
CLI module that is cheap to import (torch, FastAPI and SQLAlchemy are imported inside the
commands, so ``agora --help`` stays fast and the SDK-only install works). This module is the
only place that sees all packages at once; the packages never import each other's CLIs.

Groups shared by several packages (``expert`` has ``submit`` from the SDK and ``train``
from modelcore) are created here and handed to every registrar.
"""

from __future__ import annotations

import importlib

import typer

# Modules that contribute commands. A module whose optional dependencies are not installed
# (e.g. the SDK-only install has no torch) is skipped, and its commands are absent.
CLI_MODULES = (
    "registry.cli",
    "registry.client.cli",
    "worker.cli",
    "agora.model_cli",
    "agora.compose_cli",
)

GROUPS = {
    "expert": "Train, submit, list and download experts.",
    "base": "Create and train base model revisions.",
    "db": "Database migrations.",
    "admin": "Administration: tokens and maintenance.",
}


def build_app() -> typer.Typer:
    root = typer.Typer(
        name="agora",
        help="Agora: a registry and compute service for a decentralized, modular language model.",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
    )

    @root.callback()
    def _root() -> None:
        """Agora: a registry and compute service for a decentralized, modular language model."""

    @root.command("version")
    def version() -> None:
        """Print the installed Agora version."""
        from importlib.metadata import version as dist_version

        typer.echo(dist_version("agora"))

    groups = {
        name: typer.Typer(name=name, help=text, no_args_is_help=True)
        for name, text in GROUPS.items()
    }
    for module_name in CLI_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing *optional dependency* is tolerated; a missing module of our own
            # is a packaging bug and must surface.
            if exc.name is not None and exc.name.split(".")[0] in {"agora", "registry", "worker"}:
                if exc.name == module_name:
                    continue
                raise
            continue
        module.register(root, groups)
    for name, group in groups.items():
        if group.registered_commands or group.registered_groups:
            root.add_typer(group, name=name)
    return root


def main() -> None:
    build_app()()


if __name__ == "__main__":
    main()
