"""``Retrieval``: one process's view of the experts' vectors, kept in step with the database.

Life cycle (built by ``create_app``; ``start`` runs in the lifespan):

- ``start``: experts whose latest version has no vector from the configured embedder (made
  by another embedder, or never) are re-embedded from their stored datasheets; then the
  FAISS indexes (one per base revision, active experts only) are built from the rows.
- Writes (submit, disable, enable) call ``mark_changed`` in their transaction; after the
  commit the route calls ``sync``, which replays the change log into the indexes in place.
  So a disabled expert is gone from this replica's next search.
- Other replicas' changes: ``search`` calls ``sync`` when the last check is older than
  ``retrieval_refresh_seconds``; the check is one single-row SELECT of the counter.

Search: the query texts are embedded, averaged and normalised (q); an expert's score is its
best ``q . v`` over its vectors; d^2 = |q - v|^2 = 2 - 2 score (unit vectors) and the
weights over the top k are softmax(-d^2 / T) (c-BTM, Gururangan et al. 2023, section 2.3).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from registry.db.models import BaseModel
from registry.errors import AgoraError, BadRequest, PayloadTooLarge, base_model_not_found
from registry.retrieval import store
from registry.retrieval.embedders import Embedder, Vectors, normalise_rows
from registry.retrieval.index import ExpertIndex
from registry.retrieval.store import ExpertEntry, LoadedExpert
from registry.retrieval.vectors import expert_vectors
from registry.settings import Settings
from registry.validation import parse_datasheet

log = logging.getLogger("registry.retrieval")

DEFAULT_TEMPERATURE = 0.1
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
# Datasheets re-embedded per transaction at start: bounds a transaction, keeps progress.
REEMBED_BATCH = 64


@dataclass(frozen=True)
class SearchHit:
    entry: ExpertEntry
    score: float
    distance: float
    weight: float


def softmax_weights(distances_sq: Sequence[float], temperature: float) -> list[float]:
    """softmax(-d^2 / T), stable for any T > 0 (the largest logit is subtracted)."""
    if not distances_sq:
        return []
    logits = np.asarray([-d / temperature for d in distances_sq], dtype=np.float64)
    logits -= logits.max()
    w = np.exp(logits)
    return [float(x) for x in w / w.sum()]


def check_search_request(
    *, texts: Sequence[str], k: int, temperature: float, settings: Settings
) -> None:
    if not 1 <= k <= settings.search_max_k:
        raise BadRequest(f"k must be between 1 and {settings.search_max_k}", code="invalid_k")
    if not texts or not any(t.strip() for t in texts):
        raise BadRequest("texts must hold at least one non-blank text", code="empty_texts")
    if len(texts) > settings.search_max_texts:
        raise PayloadTooLarge(
            f"at most {settings.search_max_texts} texts per search", code="too_many_texts"
        )
    size = sum(len(t.encode("utf-8")) for t in texts)
    if size > settings.search_max_text_bytes:
        raise PayloadTooLarge(
            f"the texts hold {size} bytes of UTF-8; the limit is {settings.search_max_text_bytes}",
            code="texts_too_large",
        )
    if not (math.isfinite(temperature) and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise BadRequest(
            f"temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}",
            code="invalid_temperature",
        )


class Retrieval:
    def __init__(
        self, *, sessions: sessionmaker[Session], embedder: Embedder, settings: Settings
    ) -> None:
        self.sessions = sessions
        self.embedder = embedder
        self.settings = settings
        self._indexes: dict[str, ExpertIndex] = {}
        self._entries: dict[str, ExpertEntry] = {}
        self._known_bases: set[str] = set()
        self._version = -1
        self._checked_at = -math.inf
        # Serialises catch-ups (each replays the log from the version the previous reached).
        self._sync_lock = threading.Lock()
        self.started = False

    # -- embedding -------------------------------------------------------------------------

    def embed_query(self, texts: Sequence[str]) -> Vectors:
        """The unit mean of the texts' embeddings, (D,)."""
        rows = self.embedder.embed([t for t in texts if t.strip()])
        query: Vectors = normalise_rows(rows.mean(axis=0, keepdims=True))[0]
        return query

    def vectors_for_samples(self, samples: Sequence[str]) -> Vectors:
        """An expert's vectors from its datasheet's sample passages."""
        passages = [s for s in samples if s.strip()]
        if not passages:
            raise ValueError("a datasheet without samples cannot be embedded")
        return expert_vectors(
            self.embedder.embed(passages), max_centroids=self.settings.retrieval_max_centroids
        )

    # -- writes (inside the caller's transaction) -------------------------------------------

    def record_vectors(
        self, *, session: Session, expert_id: str, version: int, vectors: Vectors
    ) -> None:
        store.store_vectors(
            session=session,
            expert_id=expert_id,
            version=version,
            embedder=self.embedder.id,
            vectors=vectors,
        )
        store.bump(session=session, expert_id=expert_id)

    @staticmethod
    def mark_changed(*, session: Session, expert_id: str) -> None:
        store.bump(session=session, expert_id=expert_id)

    # -- building and catching up ----------------------------------------------------------

    def start(self) -> None:
        """Re-embed what the configured embedder lacks, then build every index."""
        t0 = time.perf_counter()
        reembedded = self._embed_missing(None)
        with self._sync_lock:
            self._full_reload()
        self.started = True
        log.info(
            "retrieval ready: embedder %s, %d experts in %d base indexes (%d re-embedded) "
            "in %.1f s",
            self.embedder.id,
            sum(len(ix.experts()) for ix in self._indexes.values()),
            len(self._indexes),
            reembedded,
            time.perf_counter() - t0,
        )

    def _embed_missing(self, expert_ids: set[str] | None) -> int:
        """Embed the datasheets of experts without vectors from this embedder; returns how many."""
        with self.sessions() as session, session.begin():
            missing = store.experts_missing_vectors(
                session=session, embedder=self.embedder.id, expert_ids=expert_ids
            )
        if missing:
            log.info("embedding %d expert(s) with %s", len(missing), self.embedder.id)
        done = 0
        for start in range(0, len(missing), REEMBED_BATCH):
            batch = missing[start : start + REEMBED_BATCH]
            with self.sessions() as session, session.begin():
                sheets = store.datasheets(session=session, versions=batch)
            made: list[tuple[str, int, Vectors]] = []
            for expert_id, version in batch:
                raw = sheets.get(expert_id, "").encode("utf-8")
                try:
                    sheet = parse_datasheet(raw, max_bytes=max(1, len(raw)))
                    made.append((expert_id, version, self.vectors_for_samples(sheet.samples)))
                except (AgoraError, ValueError) as exc:
                    # A datasheet stored under older rules: the expert stays unsearchable
                    # rather than blocking start-up.
                    log.warning("expert %s v%d cannot be embedded: %s", expert_id, version, exc)
            with self.sessions() as session, session.begin():
                for expert_id, version, vectors in made:
                    try:
                        with session.begin_nested():
                            stored = store.replace_vectors_of_embedder(
                                session=session,
                                expert_id=expert_id,
                                version=version,
                                embedder=self.embedder.id,
                                vectors=vectors,
                            )
                    except IntegrityError:
                        # Another replica with this embedder stored them first: theirs serve.
                        stored = False
                    done += int(stored)
        return done

    def _index_for(self, base_revision: str) -> ExpertIndex:
        index = self._indexes.get(base_revision)
        if index is None:
            index = ExpertIndex(
                self.embedder.dim, exact_max=self.settings.retrieval_exact_max_vectors
            )
            self._indexes[base_revision] = index
        return index

    def _full_reload(self) -> None:
        with self.sessions() as session, session.begin():
            version = store.current_version(session=session)
            loaded = list(store.load_experts(session=session, embedder=self.embedder.id))
        per_base: dict[str, list[LoadedExpert]] = {}
        for item in loaded:
            if item.entry.active and len(item.ids):
                per_base.setdefault(item.entry.base_revision, []).append(item)
        indexes: dict[str, ExpertIndex] = {}
        for base, items in per_base.items():
            index = ExpertIndex(
                self.embedder.dim, exact_max=self.settings.retrieval_exact_max_vectors
            )
            index.build((it.entry.id, it.ids, it.vectors) for it in items)
            indexes[base] = index
        self._indexes = indexes
        self._entries = {item.entry.id: item.entry for item in loaded}
        self._version = version
        self._checked_at = time.monotonic()

    def sync(self, *, force: bool = True) -> None:
        """Catch up with the database's change log. ``force=False`` (searches) checks only
        when the last check is older than the refresh interval, and never waits for a
        catch-up another thread is running: the current index answers meanwhile."""
        if not force:
            if time.monotonic() - self._checked_at < self.settings.retrieval_refresh_seconds:
                return
            if not self._sync_lock.acquire(blocking=False):
                return
        else:
            self._sync_lock.acquire()
        try:
            self._catch_up()
        finally:
            self._sync_lock.release()

    def _catch_up(self) -> None:
        """Replay the change log since our version (the caller holds ``_sync_lock``)."""
        with self.sessions() as session, session.begin():
            version = store.current_version(session=session)
            if version == self._version:
                self._checked_at = time.monotonic()
                return
            if version < self._version:
                changed = None  # the counter went back (a restored database): rebuild
            else:
                changed = store.changed_experts(session=session, after=self._version, upto=version)
        if changed is None:
            self._full_reload()
            return
        # Experts another replica accepted with another embedder need our vectors too.
        self._embed_missing(changed)
        with self.sessions() as session, session.begin():
            loaded = list(
                store.load_experts(session=session, embedder=self.embedder.id, expert_ids=changed)
            )
        for item in loaded:
            self._apply(item)
        self._version = version
        self._checked_at = time.monotonic()

    def _apply(self, item: LoadedExpert) -> None:
        entry = item.entry
        previous = self._entries.get(entry.id)
        if previous is not None and previous.base_revision != entry.base_revision:
            # A new version on another base moves the expert to that base's index.
            self._index_for(previous.base_revision).remove(entry.id)
        self._entries[entry.id] = entry
        index = self._index_for(entry.base_revision)
        if entry.active and len(item.ids):
            index.upsert(entry.id, item.ids, item.vectors)
        else:
            index.remove(entry.id)

    # -- reads -----------------------------------------------------------------------------

    def check_base(self, base_revision: str) -> None:
        if base_revision in self._known_bases:
            return
        with self.sessions() as session, session.begin():
            known = session.get(BaseModel, base_revision) is not None if base_revision else False
        if not known:
            raise base_model_not_found(base_revision)
        # Base revisions are immutable and never deleted: a positive answer stays true.
        self._known_bases.add(base_revision)

    def search(
        self, *, texts: Sequence[str], base_revision: str, k: int, temperature: float
    ) -> list[SearchHit]:
        check_search_request(texts=texts, k=k, temperature=temperature, settings=self.settings)
        self.check_base(base_revision)
        self.sync(force=False)
        return self.search_vector(
            self.embed_query(texts), base_revision=base_revision, k=k, temperature=temperature
        )

    def search_vector(
        self, query_D: Vectors, *, base_revision: str, k: int, temperature: float
    ) -> list[SearchHit]:
        index = self._indexes.get(base_revision)
        if index is None:
            return []
        hits = [(self._entries.get(eid), score) for eid, score in index.search(query_D, k)]
        found = [(entry, score) for entry, score in hits if entry is not None]
        distances_sq = [max(0.0, 2.0 - 2.0 * score) for _, score in found]
        weights = softmax_weights(distances_sq, temperature)
        return [
            SearchHit(entry=entry, score=score, distance=math.sqrt(d2), weight=w)
            for (entry, score), d2, w in zip(found, distances_sq, weights, strict=True)
        ]

    def index_for(self, base_revision: str) -> ExpertIndex | None:
        """The live index of a base (tests compare it with one rebuilt from the database)."""
        return self._indexes.get(base_revision)
