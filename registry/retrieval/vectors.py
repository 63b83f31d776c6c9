"""An expert's retrieval vectors, from the embeddings of its datasheet's sample passages.

The first vector is always the normalised mean of the passages (the expert's centroid, as
in c-BTM). When the passages are multi-modal (a "law and cooking" expert), the mean sits
between the modes, close to neither, so up to ``max_centroids`` k-means centroids are added;
search scores an expert by its best vector. k-means here is spherical (cosine), seeded by a
deterministic k-means++, so the same datasheet always gives the same vectors.

Shapes: P passages, D embedding dimension, K clusters.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from registry.retrieval.embedders import Vectors, normalise_rows

# A split is kept only when the passages of different clusters are far less alike than
# passages of the same cluster: mean cross-cluster cosine < MAX_CROSS_RATIO x mean
# within-cluster cosine. On MiniLM, a k-means split of one topic's passages scored 0.39-0.70
# and splits of two or three unrelated topics -0.05-0.24. (Silhouette scores were tried
# first; with a handful of passages they rated a split of one topic as high as two topics.)
MAX_CROSS_RATIO = 0.25
MIN_PASSAGES_PER_MODE = 2


def _kmeans(x_PD: Vectors, k: int, *, iterations: int = 25, seed: int = 0) -> NDArray[np.int64]:
    """Spherical k-means labels (deterministic k-means++ seeding)."""
    rng = np.random.default_rng(seed)
    n = x_PD.shape[0]
    centers = [x_PD[0]]
    for _ in range(1, k):
        sims = np.max(x_PD @ np.stack(centers).T, axis=1)
        dist = np.clip(1.0 - sims, 0.0, None) ** 2
        total = float(dist.sum())
        pick = int(rng.choice(n, p=dist / total)) if total > 0 else int(rng.integers(n))
        centers.append(x_PD[pick])
    c_KD = np.stack(centers)
    labels = np.zeros(n, dtype=np.int64)
    for step in range(iterations):
        new = np.argmax(x_PD @ c_KD.T, axis=1).astype(np.int64)
        if step > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x_PD[labels == j]
            if len(members):
                c_KD[j] = members.mean(axis=0)
        c_KD = normalise_rows(c_KD)
    return labels


def _cross_ratio(sim_PP: Vectors, labels: NDArray[np.int64]) -> float:
    """Mean cosine across clusters / mean cosine within clusters (lower: better separated)."""
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    different = labels[:, None] != labels[None, :]
    within = float(sim_PP[same].mean())
    if within <= 0:
        return np.inf
    return float(sim_PP[different].mean()) / within


def expert_vectors(passages_PD: Vectors, *, max_centroids: int = 3) -> Vectors:
    """(1 + C, D): the normalised mean, then C in 0..max_centroids mode centroids."""
    if passages_PD.ndim != 2 or passages_PD.shape[0] == 0:
        raise ValueError("an expert needs at least one embedded passage")
    x_PD = normalise_rows(passages_PD)
    mean_1D = normalise_rows(x_PD.mean(axis=0, keepdims=True))
    n = x_PD.shape[0]
    sim_PP = x_PD @ x_PD.T
    best: tuple[float, NDArray[np.int64], int] | None = None
    for k in range(2, min(max_centroids, n // MIN_PASSAGES_PER_MODE) + 1):
        labels = _kmeans(x_PD, k)
        sizes = np.bincount(labels, minlength=k)
        if sizes.min() < MIN_PASSAGES_PER_MODE:
            continue
        ratio = _cross_ratio(sim_PP, labels)
        if ratio < MAX_CROSS_RATIO and (best is None or ratio < best[0]):
            best = (ratio, labels, k)
    if best is None:
        return mean_1D
    _, labels, k = best
    centroids_KD = normalise_rows(np.stack([x_PD[labels == j].mean(axis=0) for j in range(k)]))
    return np.concatenate([mean_1D, centroids_KD]).astype(np.float32)
