"""A FAISS index over the vectors of one base revision's experts.

Exact search (``IndexIDMap2`` over ``IndexFlatIP``) up to ``exact_max`` vectors; above it,
HNSW (``IndexIDMap2`` over ``IndexHNSWFlat``). Vectors are unit-norm, so inner product is
cosine similarity and ``|q - v|^2 = 2 - 2 q.v``.

Why HNSW and not IVF above the threshold: IVF needs a training pass that must be redone as
the collection drifts, and its recall depends on that training; HNSW needs none and kept
recall@10 >= 0.97 in benchmarks/retrieval.py at 1e5 vectors. HNSW cannot remove a vector,
so removal is a tombstone: searches pass an ``IDSelector`` that skips tombstoned ids, and
the graph is rebuilt without them once they exceed a quarter of it. The flat index removes
for real (``remove_ids``).

All methods are thread-safe through a readers-writer lock: searches run concurrently (FAISS
indexes may be searched from many threads at once) and an update waits for them and holds
new ones back (FAISS must not be searched while it is modified). A plain mutex serialised
every search: on a loaded machine a search thread preempted while holding it stalled the
others, and 8 API clients got no more requests/s than one (docs/retrieval.md,
"Benchmarks"; benchmarks/retrieval.py).

Ids are the ``expert_vectors`` primary keys; an expert owns several ids (its mean and mode
centroids), and its score is the best of them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np
from numpy.typing import NDArray

from registry.retrieval.embedders import Vectors

# Graph degree and search breadth: M=32/efSearch=64 met the recall@10 and latency goals at
# 1e5 vectors of d=384 (docs/retrieval.md, "Benchmarks"; benchmarks/retrieval.py).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 64
TOMBSTONE_REBUILD_FRACTION = 0.25


class ReadWriteLock:
    """Many readers at once, or one writer; a waiting writer holds back new readers (so a
    steady stream of searches cannot starve an update)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _omp_threads(n: int) -> None:
    """OpenMP's thread count is per calling thread (each request thread starts at the core
    count). For one query, a flat search split over the cores of a loaded machine was many
    times slower than on one thread: the team's spin-waits fight other processes
    (docs/retrieval.md, "Figures behind the code"). Concurrent requests give the
    parallelism instead."""
    faiss.omp_set_num_threads(n)


class ExpertIndex:
    """The searchable vectors of one base revision; ``kind`` is "exact" or "hnsw"."""

    def __init__(self, dim: int, *, exact_max: int, ef_search: int = HNSW_EF_SEARCH) -> None:
        self.dim = dim
        self.exact_max = exact_max
        self.ef_search = ef_search
        self._lock = ReadWriteLock()
        self._owner: dict[int, str] = {}  # vector id -> expert id (live vectors only)
        self._vectors_of: dict[str, list[int]] = {}  # expert id -> its live vector ids
        self._tombstones: set[int] = set()  # HNSW only: ids in the graph no longer live
        self._selector: tuple[faiss.IDSelector, faiss.IDSelector] | None = None
        # An upper bound of the vectors any one expert has (not lowered on removal: fetching
        # a few more candidates is harmless; recomputing it would cost O(experts) a search).
        self._max_per_expert = 1
        self._index: faiss.Index = self._new_index("exact")
        self.kind = "exact"

    # -- building --------------------------------------------------------------------------

    def _new_index(self, kind: str) -> faiss.Index:
        if kind == "exact":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        hnsw = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        hnsw.hnsw.efSearch = self.ef_search
        return faiss.IndexIDMap2(hnsw)

    def _rebuild(self, ids: NDArray[np.int64], vectors: Vectors) -> None:
        kind = "exact" if len(ids) <= self.exact_max else "hnsw"
        index = self._new_index(kind)
        if len(ids):
            # Building a graph parallelises well; searching one query does not (below).
            _omp_threads((os.cpu_count() or 1) if kind == "hnsw" else 1)
            try:
                index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
            finally:
                _omp_threads(1)
        self._index, self.kind = index, kind
        self._tombstones = set()
        self._selector = None

    def build(self, items: Iterable[tuple[str, NDArray[np.int64], Vectors]]) -> None:
        """Replace the whole content by ``(expert id, vector ids, vectors)`` triples."""
        owner: dict[int, str] = {}
        vectors_of: dict[str, list[int]] = {}
        id_parts: list[NDArray[np.int64]] = []
        vec_parts: list[Vectors] = []
        for expert_id, ids, vecs in items:
            vectors_of[expert_id] = [int(i) for i in ids]
            owner.update((int(i), expert_id) for i in ids)
            id_parts.append(np.asarray(ids, dtype=np.int64))
            vec_parts.append(np.asarray(vecs, dtype=np.float32))
        all_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int64)
        all_vecs = np.concatenate(vec_parts) if vec_parts else np.zeros((0, self.dim), np.float32)
        with self._lock.write():
            self._rebuild(all_ids, all_vecs)
            self._owner, self._vectors_of = owner, vectors_of
            self._max_per_expert = max((len(v) for v in vectors_of.values()), default=1)

    def _live_arrays(self) -> tuple[NDArray[np.int64], Vectors]:
        ids = np.fromiter(self._owner.keys(), dtype=np.int64, count=len(self._owner))
        vectors = np.zeros((len(ids), self.dim), dtype=np.float32)
        for row, vid in enumerate(ids):
            vectors[row] = self._index.reconstruct(int(vid))
        return ids, vectors

    # -- updates ---------------------------------------------------------------------------

    def _remove_locked(self, expert_id: str) -> None:
        ids = self._vectors_of.pop(expert_id, [])
        for vid in ids:
            self._owner.pop(vid, None)
        if not ids:
            return
        if self.kind == "exact":
            # The stubs know only the IDSelector overload; the array one exists too.
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))  # type: ignore[arg-type]
        else:
            self._tombstones.update(ids)
            self._tombstones_changed()

    def remove(self, expert_id: str) -> None:
        with self._lock.write():
            self._remove_locked(expert_id)
            self._maybe_compact_locked()

    def upsert(self, expert_id: str, ids: NDArray[np.int64], vectors: Vectors) -> None:
        """Make ``ids``/``vectors`` the expert's live vectors (replacing any it had)."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock.write():
            current = self._vectors_of.get(expert_id, [])
            if sorted(current) == sorted(int(i) for i in ids):
                return
            self._remove_locked(expert_id)
            revived = [int(i) for i in ids if int(i) in self._tombstones]
            if revived and len(revived) == len(ids):
                # Re-enabled with the same vectors: they are still in the graph.
                self._tombstones.difference_update(revived)
                self._tombstones_changed()
            else:
                if revived:
                    # A re-used id with new content cannot be re-added to HNSW: rebuild.
                    self._tombstones.difference_update(revived)
                    live_ids, live_vecs = self._live_arrays()
                    self._rebuild(live_ids, live_vecs)
                self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
            self._vectors_of[expert_id] = [int(i) for i in ids]
            self._owner.update((int(i), expert_id) for i in ids)
            self._max_per_expert = max(self._max_per_expert, len(ids))
            self._maybe_compact_locked()

    def _maybe_compact_locked(self) -> None:
        live = len(self._owner)
        too_many_tombstones = self.kind == "hnsw" and len(
            self._tombstones
        ) > TOMBSTONE_REBUILD_FRACTION * max(1, self._index.ntotal)
        wrong_kind = (self.kind == "exact" and live > self.exact_max) or (
            # Hysteresis: fall back to exact only well below the threshold.
            self.kind == "hnsw" and live < self.exact_max // 2
        )
        if too_many_tombstones or wrong_kind:
            ids, vectors = self._live_arrays()
            self._rebuild(ids, vectors)

    # -- reads -----------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock.read():
            return len(self._owner)

    def experts(self) -> set[str]:
        with self._lock.read():
            return set(self._vectors_of)

    def vector_ids(self) -> set[int]:
        with self._lock.read():
            return set(self._owner)

    def reconstruct(self, vector_id: int) -> Vectors:
        with self._lock.read():
            if vector_id not in self._owner:
                raise KeyError(vector_id)
            return np.asarray(self._index.reconstruct(int(vector_id)), dtype=np.float32)

    def _tombstones_changed(self) -> None:
        """Rebuild the selector that skips tombstoned ids (under the write lock: readers
        share it, and a FAISS selector does not own the batch it points to, so both are
        kept together and replaced only while no search runs)."""
        if not self._tombstones:
            self._selector = None
            return
        batch = faiss.IDSelectorBatch(
            np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
        )
        self._selector = (batch, faiss.IDSelectorNot(batch))

    def search(self, query_D: Vectors, k: int) -> list[tuple[str, float]]:
        """The best ``k`` experts for one unit query: (expert id, best inner product)."""
        q_1D = np.ascontiguousarray(query_D.reshape(1, -1), dtype=np.float32)
        _omp_threads(1)
        with self._lock.read():
            if not self._owner:
                return []
            # Enough vectors that k distinct experts are among them, whatever their counts.
            fetch = min(k * self._max_per_expert, len(self._owner))
            if self.kind == "hnsw":
                params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                    efSearch=max(self.ef_search, fetch)
                )
                if self._selector is not None:
                    params.sel = self._selector[1]
                scores, ids = self._index.search(q_1D, fetch, params=params)
            else:
                scores, ids = self._index.search(q_1D, fetch)
            owner = self._owner
            best: dict[str, float] = {}
            for score, vid in zip(scores[0].tolist(), ids[0].tolist(), strict=True):
                expert = owner.get(int(vid)) if vid >= 0 else None
                if expert is not None and score > best.get(expert, -np.inf):
                    best[expert] = float(score)
        return sorted(best.items(), key=lambda item: (-item[1], item[0]))[:k]
