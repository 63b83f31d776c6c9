from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from modelcore.data import (
    Corpus,
    discover_domains,
    load_discovery,
    save_discovery,
    synthetic_corpus,
)
from modelcore.data.balanced import balanced_assign, balanced_kmeans


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_synthetic_domains(method: str, seed: int) -> None:
    corpus = synthetic_corpus(4, seed=seed, docs_per_domain=40, shared_word_fraction=0.3)
    texts, labels = corpus.texts()
    found = discover_domains(texts, 4, method=method, seed=seed)
    assert adjusted_rand_score(labels, found.labels) >= 0.9
    # New text goes to the cluster holding its domain's training text.
    cluster_of = {
        name: Counter(found.labels[[lab == name for lab in labels]].tolist()).most_common(1)[0][0]
        for name in corpus.domains
    }
    heldout, heldout_labels = corpus.texts("heldout")
    hits = [
        cluster_of[lab] == a for lab, a in zip(heldout_labels, found.assign(heldout), strict=True)
    ]
    assert np.mean(hits) >= 0.9


def test_real_corpus_clusters_are_exactly_balanced(small_corpus: Corpus) -> None:
    texts, labels = small_corpus.texts()
    k = 6 if len(texts) % 6 else 7  # a k that does not divide n: sizes must differ by one
    found = discover_domains(texts, k, seed=0)
    sizes = found.sizes()
    print(
        "balanced k-means cluster sizes:",
        sizes,
        "ARI vs named domains:",
        adjusted_rand_score(labels, found.labels),
    )
    assert sorted(set(sizes)) == [len(texts) // k, len(texts) // k + 1]
    assert sum(sizes) == len(texts)
    # The clusters carry domain signal (0 is chance; measured about 0.5 at k = 5).
    assert adjusted_rand_score(labels, found.labels) > 0.2
    again = discover_domains(texts, k, seed=0)
    assert np.array_equal(again.labels, found.labels)


def test_agglomerative_tree_is_a_hierarchy(small_corpus: Corpus) -> None:
    texts, _ = small_corpus.texts()
    found = discover_domains(texts[:120], 4, method="agglomerative")
    tree = found.tree
    assert tree is not None
    assert np.array_equal(tree.cut(4), found.labels)
    prev = tree.cut(1)
    assert set(prev.tolist()) == {0}
    for k in range(2, 12):
        cur = tree.cut(k)
        assert len(set(cur.tolist())) == k
        # Nested: every cluster at k lies inside one cluster at k - 1.
        for c in set(cur.tolist()):
            assert len(set(prev[cur == c].tolist())) == 1
        prev = cur
    link = tree.linkage()
    assert link.shape == (119, 4)
    assert link[-1, 3] == 120
    assert np.all(np.diff(link[:, 2]) >= -1e-12)  # Ward heights never decrease


def test_weights_are_a_distribution_over_top_k(synth: Corpus) -> None:
    texts, _ = synth.texts()
    found = discover_domains(texts, 4, seed=0)
    heldout, _ = synth.texts("heldout")
    w = found.weights(heldout, temperature=0.1, top_k=2)
    assert w.shape == (len(heldout), 4)
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert np.all((w > 0).sum(1) <= 2)
    assert np.array_equal(w.argmax(1), found.assign(heldout))
    with pytest.raises(ValueError):
        found.weights(heldout, temperature=0)


def test_balanced_assign_is_exact_and_optimal_when_unconstrained() -> None:
    rng = np.random.default_rng(0)
    d = rng.random((103, 5))
    sizes = np.bincount(balanced_assign(d), minlength=5)
    assert sorted(sizes.tolist()) == [20, 20, 21, 21, 21]
    # Points already balanced around their nearest cluster keep it.
    d = np.full((6, 3), 1.0)
    d[np.arange(6), [0, 1, 2, 2, 1, 0]] = 0.0
    assert balanced_assign(d).tolist() == [0, 1, 2, 2, 1, 0]
    x = rng.normal(size=(50, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a, b = balanced_kmeans(x, 3, seed=7), balanced_kmeans(x, 3, seed=7)
    assert np.array_equal(a.labels, b.labels)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_clusters"):
        discover_domains(["a b", "c d"], 3)
    with pytest.raises(ValueError, match="method"):
        discover_domains(["a b", "c d"], 1, method="dbscan")
    with pytest.raises(ValueError, match="at least 2 texts"):
        discover_domains(["a b"], 1)


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_saved_discovery_routes_new_text_identically(
    synth: Corpus, tmp_path: Path, method: str
) -> None:
    texts, _ = synth.texts()
    found = discover_domains(texts, 4, method=method, seed=0)
    path = tmp_path / "discovery.safetensors"
    save_discovery(found, path)
    back = load_discovery(path)
    heldout, _ = synth.texts("heldout")
    np.testing.assert_allclose(back.distances(heldout), found.distances(heldout), atol=1e-12)
    assert np.array_equal(back.labels, found.labels)
    assert back.method == method
    if method == "agglomerative":
        assert back.tree is not None
        assert np.array_equal(back.tree.cut(7), found.tree.cut(7))  # type: ignore[union-attr]
    path.write_bytes(path.read_bytes().replace(b"agora.discovery/1", b"agora.discovery/9"))
    with pytest.raises(ValueError, match="not an"):
        load_discovery(path)
