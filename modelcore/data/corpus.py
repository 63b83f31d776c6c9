"""Named text domains with deterministic train / held-out splits.

How a domain is built (``build_corpus``), and why:

1. Its documents (``sources.list_sources``) are visited in the order of
   ``sha256("{seed}:order:{doc_id}")``: under a byte cap that takes a uniform sample of the
   domain rather than the alphabetically first files (all of ``asyncio/``).
2. A document belongs to held-out iff ``sha256("split:{doc_id}") < heldout_fraction``
   (as a fraction of 2^64). The split depends on nothing but the id, so raising a cap or
   changing the seed never moves a held-out document into train: a model trained on one
   corpus build is never evaluated on its own training text from another build.
3. Each document is chunked at line boundaries into passages of about ``passage_bytes``;
   a long document contributes a hash-chosen subset of its passages up to
   ``max_document_bytes``, so one huge file cannot fill a domain and held-out text is a
   sample of many documents.
4. Passages fill the held-out budget (``heldout_fraction * max_bytes_per_domain``) and the
   train budget independently; each split closes at the first passage that would overflow
   it, so a small corpus reads only the files it uses.

A tiny domain whose documents all fall on one side gets the included document most
inclined to the other side moved there (the only case where the split depends on the caps).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelcore.data.sources import DOMAIN_NAMES, SourceDoc, SourcePaths, list_sources

__all__ = ["Corpus", "Domain", "build_corpus", "chunk_text"]

_FORMAT = "agora.corpus/1"


@dataclass(frozen=True)
class Domain:
    """One named domain; ``*_ids`` are the stable passage ids (``domain:doc_id#index``)."""

    name: str
    train: list[str]
    heldout: list[str]
    train_ids: list[str] = field(default_factory=list)
    heldout_ids: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        docs = {_doc_of(pid) for pid in self.train_ids + self.heldout_ids}
        return {
            "train_bytes": sum(len(t.encode("utf-8")) for t in self.train),
            "heldout_bytes": sum(len(t.encode("utf-8")) for t in self.heldout),
            "train_passages": len(self.train),
            "heldout_passages": len(self.heldout),
            "documents": len(docs),
        }


@dataclass(frozen=True)
class Corpus:
    domains: dict[str, Domain]
    params: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, dict[str, int]]:
        return {name: d.sizes() for name, d in self.domains.items()}

    def texts(self, split: str = "train") -> tuple[list[str], list[str]]:
        """All passages of one split with their domain names (for discovery and tokenizers)."""
        if split not in {"train", "heldout"}:
            raise ValueError("split must be 'train' or 'heldout'")
        texts: list[str] = []
        labels: list[str] = []
        for name, dom in self.domains.items():
            part = dom.train if split == "train" else dom.heldout
            texts += part
            labels += [name] * len(part)
        return texts, labels

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "params": self.params,
            "domains": {
                name: {
                    "train": [
                        {"id": i, "text": t} for i, t in zip(d.train_ids, d.train, strict=True)
                    ],
                    "heldout": [
                        {"id": i, "text": t} for i, t in zip(d.heldout_ids, d.heldout, strict=True)
                    ],
                }
                for name, d in self.domains.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Corpus:
        if data.get("format") != _FORMAT:
            raise ValueError(f"not an {_FORMAT} document")
        domains = {}
        for name, parts in data["domains"].items():
            tr, ho = parts["train"], parts["heldout"]
            domains[name] = Domain(
                name,
                [p["text"] for p in tr],
                [p["text"] for p in ho],
                [p["id"] for p in tr],
                [p["id"] for p in ho],
            )
        return cls(domains, dict(data.get("params", {})))

    def fingerprint(self) -> str:
        """sha256 of the passages (ids and text); equal iff two builds hold the same corpus."""
        h = hashlib.sha256()
        for name in sorted(self.domains):
            d = self.domains[name]
            for split, ids, texts in (
                ("train", d.train_ids, d.train),
                ("heldout", d.heldout_ids, d.heldout),
            ):
                for pid, text in zip(ids, texts, strict=True):
                    for part in (name, split, pid, text):
                        h.update(part.encode("utf-8"))
                        h.update(b"\0")
        return h.hexdigest()


def _unit(key: str) -> float:
    """A stable uniform number in [0, 1) from a string."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


def _split_bytes(piece: str, limit: int) -> list[str]:
    """Cut one over-long line into pieces of at most ``limit`` UTF-8 bytes (whole characters)."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for ch in piece:
        n = len(ch.encode("utf-8"))
        if size + n > limit and cur:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(ch)
        size += n
    if cur:
        out.append("".join(cur))
    return out


def chunk_text(text: str, passage_bytes: int) -> list[str]:
    """Passages of at most ``passage_bytes`` UTF-8 bytes, cut at line ends where possible.

    Concatenating the result gives ``text`` back (whitespace-only passages are kept here;
    the corpus builder drops them).
    """
    if passage_bytes < 4:
        raise ValueError("passage_bytes must be at least 4 (one UTF-8 character)")
    passages: list[str] = []
    cur: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > passage_bytes and cur:
            passages.append("".join(cur))
            cur, size = [], 0
        if n > passage_bytes:
            passages += _split_bytes(line, passage_bytes)
            continue
        cur.append(line)
        size += n
    if cur:
        passages.append("".join(cur))
    return passages


def _doc_passages(
    doc_id: str, text: str, passage_bytes: int, max_document_bytes: int, seed: int
) -> list[tuple[str, str]]:
    """(passage id, text) of one document, at most ``max_document_bytes`` of them."""
    chunks = [(f"{doc_id}#{i}", c) for i, c in enumerate(chunk_text(text, passage_bytes))]
    chunks = [(pid, c) for pid, c in chunks if c.strip()]
    if sum(len(c.encode("utf-8")) for _, c in chunks) <= max_document_bytes:
        return chunks
    picked: set[int] = set()
    size = 0
    for i in sorted(range(len(chunks)), key=lambda i: _unit(f"{seed}:passage:{chunks[i][0]}")):
        n = len(chunks[i][1].encode("utf-8"))
        if size + n > max_document_bytes and picked:
            break
        picked.add(i)
        size += n
    return [chunks[i] for i in sorted(picked)]


def _doc_of(passage_id: str) -> str:
    return passage_id.rsplit("#", 1)[0]


def _rebalance_degenerate(
    picked: dict[str, list[tuple[str, str]]], heldout_fraction: float
) -> None:
    """A tiny domain whose documents all hashed to one side gives the other side the
    document most inclined to it (smallest / largest split hash)."""
    for empty, full, pick in (("heldout", "train", min), ("train", "heldout", max)):
        if picked[empty] or (empty == "heldout" and heldout_fraction == 0):
            continue
        docs = {_doc_of(pid) for pid, _ in picked[full]}
        if len(docs) < 2:
            continue
        moved = pick(docs, key=lambda d: _unit(f"split:{d}"))
        picked[empty] = [p for p in picked[full] if _doc_of(p[0]) == moved]
        picked[full] = [p for p in picked[full] if _doc_of(p[0]) != moved]


def _build_domain(
    name: str,
    docs: list[SourceDoc],
    *,
    max_bytes: int | None,
    heldout_fraction: float,
    passage_bytes: int,
    max_document_bytes: int,
    seed: int,
) -> Domain | None:
    budget = {
        "heldout": None if max_bytes is None else int(max_bytes * heldout_fraction),
        "train": None if max_bytes is None else max_bytes - int(max_bytes * heldout_fraction),
    }
    picked: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    used = {"train": 0, "heldout": 0}
    closed: set[str] = set()
    order = sorted(docs, key=lambda d: _unit(f"{seed}:order:{name}:{d.id}"))
    for doc in order:
        if len(closed) == 2:
            break
        doc_id = f"{name}:{doc.id}"
        split = "heldout" if _unit(f"split:{doc_id}") < heldout_fraction else "train"
        if split in closed:
            continue
        text = doc.load()
        if text is None:
            continue
        for pid, passage in _doc_passages(doc_id, text, passage_bytes, max_document_bytes, seed):
            n = len(passage.encode("utf-8"))
            cap = budget[split]
            if cap is not None and used[split] + n > cap and picked[split]:
                closed.add(split)
                break
            picked[split].append((pid, passage))
            used[split] += n
    if not picked["train"] and not picked["heldout"]:
        return None
    _rebalance_degenerate(picked, heldout_fraction)

    # Sorted by the stable id (numeric passage index), independent of the sampling order.
    def key(item: tuple[str, str]) -> tuple[str, int]:
        doc, idx = item[0].rsplit("#", 1)
        return doc, int(idx)

    tr = sorted(picked["train"], key=key)
    ho = sorted(picked["heldout"], key=key)
    return Domain(
        name, [t for _, t in tr], [t for _, t in ho], [i for i, _ in tr], [i for i, _ in ho]
    )


@functools.cache
def _installed() -> tuple[str, ...]:
    """Installed distributions, listed once per process (as the license texts are)."""
    return tuple(
        sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    )


def _cache_key(params: dict[str, Any], paths: SourcePaths) -> str:
    # Everything the sources depend on short of reading them: interpreter, installed
    # distributions (licenses), roots. Editing installed files in place is not detected.
    dists = list(_installed())
    blob = json.dumps(
        {
            "params": params,
            "python": sys.version,
            "paths": [str(p) for p in vars(paths).values()],
            "dists": dists,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".corpus-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_corpus(
    *,
    max_bytes_per_domain: int | None = 1 << 20,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    domains: Sequence[str] | None = None,
    passage_bytes: int = 4096,
    max_document_bytes: int = 32 * 1024,
    system_include: Path | None = Path("/usr/include"),
    cache_dir: Path | None = None,
    paths: SourcePaths | None = None,
) -> Corpus:
    """Assemble the named domains of this Python installation (see ``sources``).

    ``domains=None`` takes every domain present here; naming one that is absent is an
    error. ``system_include=None`` leaves ``/usr/include`` out of ``c_headers`` (it varies
    between machines more than the rest). With ``cache_dir``, the built corpus is stored as
    JSON keyed by the parameters and reused.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError("heldout_fraction must be in [0, 1)")
    if max_bytes_per_domain is not None and max_bytes_per_domain <= 0:
        raise ValueError("max_bytes_per_domain must be positive (or None for no cap)")
    if max_document_bytes < passage_bytes:
        raise ValueError("max_document_bytes must be at least passage_bytes")
    names = list(DOMAIN_NAMES if domains is None else domains)
    if len(set(names)) != len(names):
        raise ValueError("domains must not repeat")
    paths = paths or SourcePaths.current(system_include=system_include)
    params: dict[str, Any] = {
        "max_bytes_per_domain": max_bytes_per_domain,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "domains": names,
        "passage_bytes": passage_bytes,
        "max_document_bytes": max_document_bytes,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"corpus-{_cache_key(params, paths)}.json"
        if cache_file.is_file():
            try:
                return Corpus.from_dict(json.loads(cache_file.read_text(encoding="utf-8")))
            except (ValueError, KeyError, TypeError):
                pass  # a damaged cache entry is rebuilt and overwritten
    built: dict[str, Domain] = {}
    for name in names:
        dom = _build_domain(
            name,
            list_sources(name, paths),
            max_bytes=max_bytes_per_domain,
            heldout_fraction=heldout_fraction,
            passage_bytes=passage_bytes,
            max_document_bytes=max_document_bytes,
            seed=seed,
        )
        if dom is None:
            if domains is not None:
                raise ValueError(f"domain {name!r} has no documents on this installation")
            continue
        built[name] = dom
    corpus = Corpus(built, params)
    if cache_file is not None:
        _write_atomic(cache_file, json.dumps(corpus.to_dict(), ensure_ascii=False))
    return corpus
