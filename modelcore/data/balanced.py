"""Balanced k-means: every cluster gets floor(n/k) or ceil(n/k) points.

c-BTM (Gururangan et al. 2023, section 2.1) balances its clusters so that every expert
trains on the same amount of data; without it, k-means on TF-IDF puts most passages of a
corpus dominated by one style into a few clusters.

The assignment step is a greedy capacity-constrained assignment in rounds: every
unassigned point proposes to its nearest cluster that still has room, and each cluster
keeps its nearest proposers up to its capacity (floor(n/k), plus one for the ``n mod k``
clusters in most demand), so sizes come out exactly balanced. Greedy rather than an
optimal transport/auction solve: at most K vectorised rounds, deterministic, and on the
corpora here the centroid update stops changing it within a few iterations.

Shapes: N points, K clusters, D dims. Points are expected L2-normalised (spherical
k-means, as c-BTM: Euclidean distance on unit vectors is a monotone function of cosine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BalancedKMeansResult", "balanced_assign", "balanced_kmeans"]


def _sq_dists(x_ND: np.ndarray, c_KD: np.ndarray) -> np.ndarray:
    d_NK = (x_ND * x_ND).sum(1)[:, None] - 2.0 * x_ND @ c_KD.T + (c_KD * c_KD).sum(1)[None, :]
    return np.asarray(np.maximum(d_NK, 0.0))


def balanced_assign(d_NK: np.ndarray) -> np.ndarray:
    """Labels (N,) that greedily minimise distance under exactly balanced capacities."""
    n, k = d_NK.shape
    lo, extra = divmod(n, k)
    # The n mod k ceil slots go to the clusters most points would pick unconstrained.
    demand = np.bincount(d_NK.argmin(1), minlength=k)
    cap = np.full(k, lo)
    cap[np.argsort(-demand, kind="stable")[:extra]] += 1
    labels = np.full(n, -1, dtype=np.int64)
    size = np.zeros(k, dtype=np.int64)
    masked = d_NK.astype(np.float64, copy=True)
    # Rounds: every unassigned point proposes to its nearest cluster with room; a cluster
    # keeps its nearest proposers up to its room. Each round fills at least one cluster.
    while (free := np.flatnonzero(labels < 0)).size:
        masked[:, size >= cap] = np.inf
        choice = masked[free].argmin(1)
        for j in np.unique(choice):
            proposers = free[choice == j]
            # Stable: equal distances go to the lower point index.
            nearest = proposers[np.argsort(d_NK[proposers, j], kind="stable")]
            take = nearest[: cap[j] - size[j]]
            labels[take] = j
            size[j] += take.size
    return labels


def _init_plus_plus(x_ND: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur and Vassilvitskii 2007)."""
    n = x_ND.shape[0]
    centers = [int(rng.integers(n))]
    d_N = _sq_dists(x_ND, x_ND[centers]).min(1)
    for _ in range(1, k):
        total = d_N.sum()
        idx = int(rng.choice(n, p=d_N / total)) if total > 0 else int(rng.integers(n))
        centers.append(idx)
        d_N = np.minimum(d_N, _sq_dists(x_ND, x_ND[[idx]])[:, 0])
    return x_ND[centers].copy()


@dataclass(frozen=True)
class BalancedKMeansResult:
    labels: np.ndarray  # (N,) int64
    centroids: np.ndarray  # (K, D) float64, L2-normalised
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int


def _normalise(c_KD: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(c_KD, axis=1, keepdims=True)
    return c_KD / np.where(norms > 0, norms, 1.0)


def _run(x_ND: np.ndarray, k: int, rng: np.random.Generator, max_iter: int) -> BalancedKMeansResult:
    c_KD = _init_plus_plus(x_ND, k, rng)
    labels = np.full(x_ND.shape[0], -1, dtype=np.int64)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        new = balanced_assign(_sq_dists(x_ND, c_KD))
        if np.array_equal(new, labels):
            break
        labels = new
        c_KD = _normalise(np.stack([x_ND[labels == j].mean(0) for j in range(k)]))
    d_NK = _sq_dists(x_ND, c_KD)
    inertia = float(d_NK[np.arange(len(labels)), labels].sum())
    return BalancedKMeansResult(labels, c_KD, inertia, iterations)


def balanced_kmeans(
    x_ND: np.ndarray, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 50
) -> BalancedKMeansResult:
    """Best of ``n_init`` seeded runs (lowest inertia); deterministic in ``seed``."""
    x_ND = np.asarray(x_ND, dtype=np.float64)
    if x_ND.ndim != 2 or not 1 <= k <= x_ND.shape[0]:
        raise ValueError(f"need a 2-D array with at least k={k} rows")
    rng = np.random.default_rng(seed)
    best: BalancedKMeansResult | None = None
    for _ in range(max(1, n_init)):
        result = _run(x_ND, k, rng, max_iter)
        if best is None or result.inertia < best.inertia - 1e-12:
            best = result
    assert best is not None
    return best
