"""Unsupervised domain discovery, as in c-BTM (Gururangan et al. 2023, "Scaling Expert
Language Models with Unsupervised Domain Discovery", section 2.1).

texts -> TF-IDF (sublinear tf) -> truncated SVD -> L2 normalise -> balanced k-means.
Each cluster becomes a domain and one expert trains on it; a new text goes to the nearest
centroid (``assign``), and c-BTM's ensemble weights a text's experts by
``softmax(-d^2 / T)`` over the top-k nearest centroids (``weights``).

``method="agglomerative"`` clusters the same vectors with Ward linkage and keeps the whole
merge tree (``ClusterTree``): it can be cut at any number of clusters, so the experts of a
coarse split are the parents of a finer one (the hierarchy used when initialising a new
expert from its nearest existing one). Agglomerative clusters are not balanced.

Shapes: N texts, K clusters, D SVD dims.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from sklearn.cluster import AgglomerativeClustering
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from modelcore.data.balanced import balanced_kmeans

__all__ = ["ClusterTree", "DomainDiscovery", "discover_domains", "load_discovery", "save_discovery"]

_FORMAT = "agora.discovery/1"
_TFIDF = {"sublinear_tf": True}


def _canonical(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel so cluster ids follow their first member's index; returns (labels, old id
    of each new id). Makes labels independent of initialisation order."""
    _, first = np.unique(labels, return_index=True)
    old_ids = labels[np.sort(first)]
    remap = np.empty(int(labels.max()) + 1, dtype=np.int64)
    remap[old_ids] = np.arange(old_ids.size)
    return remap[labels], old_ids


@dataclass(frozen=True)
class ClusterTree:
    """Ward merge tree over N leaves, sklearn's convention: merge ``i`` joins nodes
    ``children[i]`` (ids < N are leaves, id N+j is merge j) at height ``distances[i]``."""

    children: np.ndarray  # (N-1, 2) int64
    distances: np.ndarray  # (N-1,) float64, non-decreasing for Ward
    n_leaves: int

    def cut(self, n_clusters: int) -> np.ndarray:
        """Labels (N,) after applying the first N - n_clusters merges."""
        n = self.n_leaves
        if not 1 <= n_clusters <= n:
            raise ValueError(f"n_clusters must be in [1, {n}]")
        parent = np.arange(2 * n - 1)

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = int(parent[i])
            return i

        for m in range(n - n_clusters):
            a, b = self.children[m]
            parent[root(int(a))] = n + m
            parent[root(int(b))] = n + m
        roots = np.array([root(i) for i in range(n)])
        return _canonical(roots)[0]

    def linkage(self) -> np.ndarray:
        """(N-1, 4) linkage matrix in scipy's format: children, height, leaf count."""
        n = self.n_leaves
        counts = np.ones(2 * n - 1, dtype=np.int64)
        for m, (a, b) in enumerate(self.children):
            counts[n + m] = counts[a] + counts[b]
        return np.column_stack([self.children, self.distances, counts[n:]]).astype(np.float64)


@dataclass(frozen=True)
class DomainDiscovery:
    labels: np.ndarray  # (N,) int64 cluster of each input text
    centroids: np.ndarray  # (K, D) L2-normalised
    tree: ClusterTree | None
    method: str
    _vectorizer: TfidfVectorizer = field(repr=False)
    _components: np.ndarray = field(repr=False)  # (D, V) SVD basis over the TF-IDF vocabulary

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def sizes(self) -> list[int]:
        return [int(c) for c in np.bincount(self.labels, minlength=self.n_clusters)]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit vectors of texts in the fitted TF-IDF/SVD space."""
        return _unit_rows(np.asarray(self._vectorizer.transform(list(texts)) @ self._components.T))

    def distances(self, texts: Sequence[str]) -> np.ndarray:
        """(N, K) squared Euclidean distances to the centroids."""
        x_ND = self.embed(texts)
        # Centroids have unit length; a text with no known word embeds to 0 (distance 1).
        d_NK = (x_ND * x_ND).sum(1)[:, None] + 1.0 - 2.0 * x_ND @ self.centroids.T
        return np.asarray(np.maximum(d_NK, 0.0))

    def assign(self, texts: Sequence[str]) -> np.ndarray:
        """Nearest centroid of each text, unconstrained (balance is a training-time need)."""
        return np.asarray(self.distances(texts).argmin(1))

    def top_terms(
        self, texts: Sequence[str], *, labels: np.ndarray | None = None, n: int = 8
    ) -> list[list[str]]:
        """Per cluster, the ``n`` terms whose mean TF-IDF weight over its texts most exceeds
        their mean over all the other texts (the plain mean when there is one cluster).

        ``texts``: the texts this discovery was fitted on, in order (``labels`` is theirs;
        another labelling of them, e.g. a coarser ``tree.cut``, may be given instead).
        Why not the plain mean, or the centroids mapped back through the SVD basis (both
        ranked the same words): they put "the", "of", "my" among a Perl cluster's first
        eight; the difference lists "license, gnu, program, public" (docs/data.md)."""
        labels = self.labels if labels is None else np.asarray(labels)
        if len(texts) != labels.shape[0]:
            raise ValueError("texts must be the texts the clusters label, in order")
        x_NV = self._vectorizer.transform(list(texts))
        names = self.vocabulary()
        out: list[list[str]] = []
        for j in range(int(labels.max()) + 1 if labels.size else 0):
            inside = labels == j
            score_V = np.asarray(x_NV[inside].mean(0)).ravel()
            if not inside.all():
                score_V = score_V - np.asarray(x_NV[~inside].mean(0)).ravel()
            # Stable: equal scores keep vocabulary order, so the list is deterministic.
            order = np.argsort(-score_V, kind="stable")[:n]
            out.append([names[i] for i in order if score_V[i] > 0])
        return out

    def vocabulary(self) -> list[str]:
        """The TF-IDF terms, by column."""
        terms = [""] * len(self._vectorizer.vocabulary_)
        for term, idx in self._vectorizer.vocabulary_.items():
            terms[idx] = term
        return terms

    def weights(
        self, texts: Sequence[str], *, temperature: float = 0.1, top_k: int | None = None
    ) -> np.ndarray:
        """(N, K) c-BTM mixture weights: softmax(-d^2 / T) over each text's top-k clusters,
        zero elsewhere."""
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        logits = -self.distances(texts) / temperature
        k = self.n_clusters if top_k is None else max(1, min(top_k, self.n_clusters))
        if k < self.n_clusters:
            cut = np.sort(logits, axis=1)[:, -k][:, None]
            logits = np.where(logits >= cut, logits, -np.inf)
        logits -= logits.max(1, keepdims=True)
        w = np.exp(logits)
        return np.asarray(w / w.sum(1, keepdims=True))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def discover_domains(
    texts: Sequence[str],
    n_clusters: int,
    *,
    method: str = "kmeans",
    seed: int = 0,
    n_components: int = 100,
    max_features: int = 50_000,
    n_init: int = 4,
) -> DomainDiscovery:
    """Cluster ``texts`` into ``n_clusters`` domains (see the module docstring)."""
    if method not in {"kmeans", "agglomerative"}:
        raise ValueError("method must be 'kmeans' or 'agglomerative'")
    texts = list(texts)
    if not 1 <= n_clusters <= len(texts):
        raise ValueError(f"n_clusters must be in [1, {len(texts)}] (the number of texts)")
    if len(texts) < 2:
        raise ValueError("discovery needs at least 2 texts")
    # One BLAS thread below 5k texts: on a loaded machine, OpenBLAS's spinning threads
    # made the SVD of a few hundred passages many times slower (docs/data.md, "Domain
    # discovery (c-BTM)").
    with threadpool_limits(limits=1 if len(texts) < 5000 else None):
        return _discover(
            texts,
            n_clusters=n_clusters,
            method=method,
            seed=seed,
            n_components=n_components,
            max_features=max_features,
            n_init=n_init,
        )


def _discover(
    texts: list[str],
    *,
    n_clusters: int,
    method: str,
    seed: int,
    n_components: int,
    max_features: int,
    n_init: int,
) -> DomainDiscovery:
    # sublinear tf: a word repeated 50 times in one passage (a variable name, a license
    # clause) should not outweigh vocabulary that marks the domain.
    vectorizer = TfidfVectorizer(**_TFIDF, max_features=max_features, dtype=np.float64)
    tfidf = vectorizer.fit_transform(texts)
    if tfidf.shape[1] < 2:
        raise ValueError("the texts have fewer than 2 distinct words; nothing to cluster on")
    dims = max(1, min(n_components, tfidf.shape[1] - 1, len(texts) - 1))
    svd = TruncatedSVD(n_components=dims, random_state=seed)
    x_ND = _unit_rows(svd.fit_transform(tfidf))
    tree = None
    if method == "kmeans":
        labels = balanced_kmeans(x_ND, n_clusters, seed=seed, n_init=n_init).labels
    else:
        agg = AgglomerativeClustering(
            n_clusters=None, distance_threshold=0.0, linkage="ward", compute_full_tree=True
        ).fit(x_ND)
        tree = ClusterTree(
            np.asarray(agg.children_, dtype=np.int64),
            np.asarray(agg.distances_, dtype=np.float64),
            len(texts),
        )
        labels = tree.cut(n_clusters)
    labels, _ = _canonical(np.asarray(labels, dtype=np.int64))
    centroids = _unit_rows(np.stack([x_ND[labels == j].mean(0) for j in range(n_clusters)]))
    return DomainDiscovery(labels, centroids, tree, method, vectorizer, svd.components_)


def save_discovery(found: DomainDiscovery, path: str | Path) -> None:
    """Write a fitted discovery as safetensors (never pickle): centroids, SVD basis, idf and
    labels as tensors; the vocabulary and method in ``__metadata__``. What a c-BTM expert
    set needs to route new text to its clusters on another machine."""
    terms = found.vocabulary()
    tensors = {
        "centroids": np.ascontiguousarray(found.centroids, dtype=np.float64),
        "components": np.ascontiguousarray(found._components, dtype=np.float64),
        "idf": np.ascontiguousarray(found._vectorizer.idf_, dtype=np.float64),
        "labels": np.ascontiguousarray(found.labels, dtype=np.int64),
    }
    if found.tree is not None:
        tensors["tree_children"] = np.ascontiguousarray(found.tree.children, dtype=np.int64)
        tensors["tree_distances"] = np.ascontiguousarray(found.tree.distances, dtype=np.float64)
    metadata = {"format": _FORMAT, "method": found.method, "vocabulary": json.dumps(terms)}
    save_file(tensors, str(path), metadata=metadata)


def load_discovery(path: str | Path) -> DomainDiscovery:
    with safe_open(str(path), framework="numpy") as fh:
        metadata = fh.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an {_FORMAT} file")
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    terms = json.loads(metadata["vocabulary"])
    vectorizer = TfidfVectorizer(
        **_TFIDF, vocabulary={t: i for i, t in enumerate(terms)}, dtype=np.float64
    )
    vectorizer.idf_ = tensors["idf"]
    tree = None
    if "tree_children" in tensors:
        children = tensors["tree_children"]
        tree = ClusterTree(children, tensors["tree_distances"], children.shape[0] + 1)
    return DomainDiscovery(
        tensors["labels"],
        tensors["centroids"],
        tree,
        metadata["method"],
        vectorizer,
        tensors["components"],
    )
