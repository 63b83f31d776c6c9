"""A composition's files on this machine, verified, and the one door to ``modelcore``.

The SDK downloads and verifies; building the model is ``modelcore``'s
(``modelcore/compose/local.py``). ``model_loader`` is the only place the SDK reaches it:
an explicit optional import, so the SDK installs and imports with httpx and pydantic
only and just ``Agora.load_composed`` and ``load_composed_dir`` need the ``model`` extra
(``pip install 'agora[model]'``). docs/architecture.md draws these import directions.

A composition downloaded for offline use (``Agora.download_composition(c, DIR)``,
``agora compose --out DIR``) is laid out as::

    DIR/manifest.json                              the agora.composition/1 manifest
    DIR/base/config.json, tokenizer.json, model.safetensors
    DIR/experts/<expert id>-v<version>.safetensors every expert the manifest names
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

from registry.client.cache import parse_digest, sha256_file
from registry.client.errors import AgoraError, DigestMismatch

if TYPE_CHECKING:
    from registry.client.models import Composition

__all__ = [
    "ComposedModel",
    "LocalComposition",
    "ModelDependenciesMissing",
    "expert_filename",
    "load_composed_dir",
    "model_loader",
]

INSTALL_HINT = "pip install 'agora[model]'"
MODEL_MODULE = "modelcore.compose.local"

ComposedModel: TypeAlias = Any
"""``modelcore.compose.composed.ComposedModel``: it scores (``bits_per_byte``,
``log_probs``) and generates (``generate``). The SDK never imports modelcore to name it."""


class ModelDependenciesMissing(AgoraError):
    """Running a composition locally needs ``modelcore`` and torch, which the SDK-only
    install lacks."""

    default_code = "model_dependencies_missing"


class ModelLoader(Protocol):
    """What the SDK calls in ``modelcore.compose.local``."""

    def build_composed_model(
        self,
        manifest: Mapping[str, Any],
        base_dir: str | os.PathLike[str],
        expert_files: Mapping[str, str | os.PathLike[str]],
        *,
        device: str = "cpu",
    ) -> ComposedModel: ...


@dataclass(frozen=True)
class LocalComposition:
    """A ready composition whose files are all on this machine, verified.

    ``manifest`` is the registry's manifest as JSON; ``expert_files`` maps every
    ``sha256:<hex>`` digest it names to a local file with exactly those bytes.
    """

    composition: Composition
    manifest: dict[str, Any]
    base_dir: Path
    expert_files: dict[str, Path]


def expert_filename(expert_id: str, version: int) -> str:
    return f"{expert_id}-v{version}.safetensors"


def model_loader() -> ModelLoader:
    """``modelcore.compose.local``; ``ModelDependenciesMissing`` (naming the extra to
    install) when modelcore or torch is absent. Cheap to call before a long download."""
    try:
        module = importlib.import_module(MODEL_MODULE)
    except ModuleNotFoundError as exc:
        missing = exc.name or "modelcore"
        raise ModelDependenciesMissing(
            "running a composition locally needs the model dependencies "
            f"({missing} is not installed): {INSTALL_HINT}"
        ) from exc
    return cast(ModelLoader, module)


def load_composed_dir(
    directory: str | os.PathLike[str], *, device: str = "cpu", verify: bool = True
) -> ComposedModel:
    """The composition downloaded into ``directory`` (see the module's layout), offline.

    With ``verify`` every expert file is re-hashed against the manifest's digest first
    (``DigestMismatch`` if one was altered).
    """
    root = Path(directory)
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AgoraError(
            f"{root} holds no manifest.json: not a downloaded composition",
            code="not_a_composition",
        ) from None
    if not isinstance(manifest, dict):
        raise AgoraError(f"{manifest_path} is not a JSON object", code="bad_manifest")
    refs = list(manifest.get("experts") or [])
    if manifest.get("output"):
        refs.append(manifest["output"])
    files: dict[str, Path] = {}
    for ref in refs:
        try:
            expert_id, version, digest = str(ref["id"]), int(ref["version"]), str(ref["digest"])
            hexdigest = parse_digest(digest)
        except (KeyError, TypeError, ValueError) as exc:
            raise AgoraError(
                f"{manifest_path}: bad expert reference {ref!r}", code="bad_manifest"
            ) from exc
        path = root / "experts" / expert_filename(expert_id, version)
        if not path.is_file():
            raise AgoraError(f"{path} is missing", code="composition_incomplete")
        if verify and sha256_file(path).hexdigest() != hexdigest:
            raise DigestMismatch(f"{path} does not hash to {digest} as its manifest says")
        files[digest] = path
    return model_loader().build_composed_model(manifest, root / "base", files, device=device)
