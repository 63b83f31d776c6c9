"""The one place the SDK hands files to ``modelcore``: ``Agora.load_composed`` builds the
composed model here once its inputs are downloaded and verified.

``modelcore`` (and torch) are imported inside the function, never at module level, so the
SDK installs and imports with httpx and pydantic only; only this call needs the ``model``
extra (``pip install 'agora[model]'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.client.errors import AgoraError

if TYPE_CHECKING:
    from modelcore.compose.composed import ComposedModel

INSTALL_HINT = "pip install 'agora[model]'"


class ModelDependenciesMissing(AgoraError):
    """``load_composed`` needs ``modelcore`` and torch, which the SDK-only install lacks."""

    default_code = "model_dependencies_missing"


def build_composed_model(
    manifest: Mapping[str, Any],
    base_dir: str | os.PathLike[str],
    expert_files: Mapping[str, str | os.PathLike[str]],
    *,
    device: str = "cpu",
) -> ComposedModel:
    """``ComposedModel.from_manifest`` on local, verified files.

    ``expert_files`` maps each ``sha256:<hex>`` digest the manifest names to its file.
    """
    try:
        from modelcore.compose.composed import ComposedModel
    except ModuleNotFoundError as exc:
        missing = exc.name or "modelcore"
        raise ModelDependenciesMissing(
            f"loading a composition runs it locally and needs the model dependencies "
            f"({missing} is not installed): {INSTALL_HINT}"
        ) from exc
    files = {digest: Path(path) for digest, path in expert_files.items()}
    return ComposedModel.from_manifest(manifest, Path(base_dir), files, device=device)
