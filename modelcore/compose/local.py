"""A composition whose files are on this machine, built into a ``ComposedModel``.

The SDK (``registry.client``) downloads a ready composition's manifest, base bundle and
expert files and verifies them; it never imports modelcore at module level, so it
installs without torch. To run a composition it imports this module once, optionally
(``registry/client/composed.py``, ``model_loader``), and calls ``build_composed_model``:
this module is the whole surface the SDK relies on. ``ComposedModel.from_manifest``
checks every file against its digest again before anything is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelcore.compose.composed import ComposedModel

__all__ = ["build_composed_model"]


def build_composed_model(
    manifest: Mapping[str, Any],
    base_dir: str | os.PathLike[str],
    expert_files: Mapping[str, str | os.PathLike[str]],
    *,
    device: str = "cpu",
) -> ComposedModel:
    """The composition ``manifest`` describes, on the base bundle in ``base_dir``.

    ``expert_files`` maps each ``sha256:<hex>`` digest the manifest names to its file;
    a missing or altered file is a ``ValueError`` naming it.
    """
    files = {digest: Path(path) for digest, path in expert_files.items()}
    return ComposedModel.from_manifest(manifest, Path(base_dir), files, device=device)
