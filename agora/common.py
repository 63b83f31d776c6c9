"""What every command module shares: the help panels, deprecation lines, the one
``--weights`` parser, and the check for an optional extra.

Only typer and the standard library here: ``agora --help`` imports this with the core
dependencies alone.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Annotated, Any

import typer

# The panels of `agora --help`: where a command computes tells a user what it needs.
REGISTRY_PANEL = "Registry (over HTTP: --registry, --token)"
LOCAL_PANEL = "Local (files on this machine; needs the model extra)"
ARTIFACTS_PANEL = "Experts and base models (local training, registry transfers)"
SERVER_PANEL = "Running a registry (serve, workers, database, tokens)"

EXTRAS = {
    "model": ("torch", "modelcore"),
    "server": ("fastapi", "sqlalchemy", "uvicorn", "alembic", "pydantic_settings"),
}


WeightsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--weights",
        help="Weights, one per expert: comma separated (0.7,0.3) or repeated "
        "(--weights 0.7 --weights 0.3).",
    ),
]


def echo_err(message: str) -> None:
    typer.echo(message, err=True)


def deprecation(old: str, new: str) -> None:
    """The one-line notice an old spelling prints (stderr: stdout stays parseable)."""
    echo_err(f"`{old}` is deprecated; use `{new}`")


def deprecated_command(command: Callable[..., None], old: str, new: str) -> Callable[..., None]:
    """``command`` under its old name: the same options, a deprecation line first."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        deprecation(f"agora {old}", f"agora {new}")
        command(*args, **kwargs)

    return run


def missing_modules(extra: str) -> list[str]:
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, command: str) -> None:
    """End ``command`` with one line naming the install when its extra is missing."""
    missing = missing_modules(extra)
    if missing:
        echo_err(
            f"error: `agora {command}` needs {', '.join(missing)}: pip install 'agora[{extra}]'"
        )
        raise typer.Exit(2)


def split_list(values: list[str] | None) -> list[str]:
    """Repeated and comma separated values, flattened: ``a,b --x c`` is ``a, b, c``."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def parse_weights(values: list[str] | None) -> list[float] | None:
    """``--weights``, comma separated or repeated (or both); None when not given."""
    parts = split_list(values)
    if not parts:
        return None
    try:
        return [float(part) for part in parts]
    except ValueError:
        raise typer.BadParameter(
            f"{','.join(parts)!r} is not a list of numbers", param_hint="--weights"
        ) from None
