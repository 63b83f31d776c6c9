"""Retrieval: the experts that best fit some texts, with their ensemble weights."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from registry.client.errors import AgoraError, NotFound
from registry.client.models import SearchResult, SearchResults
from registry.client.transport import Transport

DEFAULT_TEMPERATURE = 0.1
# What `nearest` sends of a contributor's data: under the server's 64 KiB / 256 texts
# search limits, spread evenly over the passages so a long corpus is sampled, not truncated.
NEAREST_MAX_BYTES = 60 * 1024
NEAREST_MAX_TEXTS = 200


class Retrieval:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def search(
        self,
        texts: str | Sequence[str],
        base_revision: str,
        *,
        k: int = 4,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> SearchResults:
        """The ``k`` active experts of ``base_revision`` that best fit ``texts``, best first,
        with ensemble weights softmax(-d^2 / temperature) that sum to 1."""
        body = {
            "texts": [texts] if isinstance(texts, str) else list(texts),
            "base_revision": base_revision,
            "k": k,
            "temperature": temperature,
        }
        return self._t.post(SearchResults, "/v1/search", body)

    def nearest(
        self, texts_or_path: str | os.PathLike[str] | Sequence[str], base_revision: str
    ) -> SearchResult:
        """The existing expert closest to a contributor's data: a text file, a directory of
        ``.txt`` files, or the texts themselves. The starting point for training a new one
        (``agora expert init --from-nearest``)."""
        passages = _sample_passages(_read_passages(texts_or_path))
        if not passages:
            raise AgoraError("no text to compare with the experts", code="empty_texts")
        found = self.search(passages, base_revision, k=1)
        if not found.results:
            raise NotFound(
                f"base revision {base_revision} has no active expert yet", code="no_expert"
            )
        return found.results[0]


def _read_passages(source: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Passages (blank-line separated paragraphs) of a file, of a directory's ``.txt``
    files, or the given texts; a one-line string naming an existing path is that path."""
    if isinstance(source, str) and ("\n" in source or not Path(source).exists()):
        texts = [source]
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        if not files:
            raise AgoraError(f"{path} holds no .txt file", code="empty_texts")
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    else:
        texts = list(source)
    passages: list[str] = []
    for text in texts:
        passages += [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return passages


def _sample_passages(passages: list[str]) -> list[str]:
    """At most NEAREST_MAX_TEXTS passages and NEAREST_MAX_BYTES, taken evenly across."""
    if not passages:
        return []
    average = max(1, sum(len(p.encode()) for p in passages) // len(passages))
    count = min(len(passages), NEAREST_MAX_TEXTS, max(1, NEAREST_MAX_BYTES // average))
    step = len(passages) / count
    picked = [passages[int(i * step)] for i in range(count)]
    out: list[str] = []
    budget = NEAREST_MAX_BYTES
    for passage in picked:
        data = passage.encode()[:budget].decode(errors="ignore")
        if not data:
            break
        out.append(data)
        budget -= len(data.encode())
    return out
