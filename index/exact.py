"""Exact top-k over a set of items for many users, visiting only the clusters that can win.

The items are grouped by k-means on their vectors. For a cluster ``C`` with centroid ``c``,
radius ``rho = max_{i in C} |q_i - c|`` and largest ranking bias ``r_C``, every member scores

    s(u, i) = r_i + x_u . q_i  <=  r_C + x_u . c + |x_u| rho          (Cauchy-Schwarz)

Each user visits clusters in order of that bound and stops at the first whose bound is below
their ``k``-th best score so far: the result is the exact top-k, found after scoring a fraction
of the items (the clusters near the user's direction). The clustering only decides how much is
visited, never what is found, so it may be stale or rough; it is rebuilt from the live vectors
at every call.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> Q = rng.normal(size=(500, 8)).astype(np.float32)
>>> b = rng.normal(size=500).astype(np.float32)
>>> X = rng.normal(size=(3, 8)).astype(np.float32)
>>> items = ClusteredItems(Q, b, np.arange(500))
>>> rows, scores = items.top_k(X, np.zeros(4, dtype=np.int64), np.zeros(0, dtype=np.int64), k=5)
>>> bool((rows == np.argsort(-(X @ Q.T + b), axis=1)[:, :5]).all())
True
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_ITEMS_PER_CLUSTER = 32
_KMEANS_ITERATIONS = 4
_FIT_SAMPLE_PER_CLUSTER = 8


# insert_descending and among are inlined into index/query.py's kernels too. Numba's on-disk cache
# checks only the file a kernel is defined in: after changing them, touch index/query.py.
@njit(cache=True, nogil=True, inline="always")
def insert_descending(vals, idx, k, x, c):
    """Put score ``x`` of item ``c`` into the descending buffer ``vals``/``idx``."""
    pos = k - 1
    while pos > 0 and vals[pos - 1] < x:
        vals[pos] = vals[pos - 1]
        idx[pos] = idx[pos - 1]
        pos -= 1
    vals[pos] = x
    idx[pos] = c


@njit(cache=True, nogil=True, inline="always")
def among(values, start, stop, x):
    """Whether ``x`` is one of ``values[start:stop]`` (short lists: a scan beats a set)."""
    for j in range(start, stop):
        if values[j] == x:
            return True
    return False


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _pruned_top_k(X, x_norms, vectors, biases, rows, starts, centroids, max_bias, radius,
                  seen_start, seen_items, floor, k):
    n_users, dim = X.shape
    n_clusters = centroids.shape[0]
    out_rows = np.full((n_users, k), -1, dtype=np.int64)
    out_scores = np.full((n_users, k), -np.inf, dtype=np.float32)
    for u in prange(n_users):
        vals = out_scores[u]
        idx = out_rows[u]
        x = X[u]
        bounds = np.empty(n_clusters, dtype=np.float32)
        for c in range(n_clusters):
            dot = np.float32(0.0)
            for f in range(dim):
                dot += x[f] * centroids[c, f]
            bound = max_bias[c] + dot + x_norms[u] * radius[c]
            bounds[c] = bound + np.float32(1e-5) * (abs(bound) + np.float32(1.0))  # float32 rounding slack
        a, b = seen_start[u], seen_start[u + 1]
        threshold = max(vals[k - 1], floor[u])
        for c in np.argsort(-bounds):
            if bounds[c] <= threshold:
                break  # clusters come in order of bound: none further can enter
            for j in range(starts[c], starts[c + 1]):
                s = biases[j]
                for f in range(dim):
                    s += x[f] * vectors[j, f]
                if s > threshold and not among(seen_items, a, b, rows[j]):
                    insert_descending(vals, idx, k, s, rows[j])
                    threshold = max(vals[k - 1], floor[u])
    return out_rows, out_scores


@njit(cache=True, nogil=True)
def _centroids(points, labels, n_clusters):
    """Mean of each cluster's points (a cluster with none keeps zeros) and the member counts."""
    sums = np.zeros((n_clusters, points.shape[1]), dtype=np.float32)
    counts = np.zeros(n_clusters, dtype=np.int64)
    for i in range(points.shape[0]):
        c = labels[i]
        counts[c] += 1
        for f in range(points.shape[1]):
            sums[c, f] += points[i, f]
    for c in range(n_clusters):
        if counts[c]:
            sums[c] /= counts[c]
    return sums, counts


def _nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    # |p - c|^2 up to the constant |p|^2
    return np.argmin((centroids * centroids).sum(axis=1) - 2.0 * points @ centroids.T, axis=1)


def _kmeans(points: np.ndarray, n_clusters: int, iterations: int, seed: int = 0) -> np.ndarray:
    """Cluster label of each point: a few Lloyd iterations on a sample, then every point to its nearest.

    The clusters only steer how much is visited, so a rough fit on a sample does.
    """
    rng = np.random.default_rng(seed)
    sample = points[rng.choice(len(points), min(len(points), _FIT_SAMPLE_PER_CLUSTER * n_clusters), replace=False)]
    centroids = sample[:n_clusters].copy()
    for _ in range(iterations):
        means, counts = _centroids(sample, _nearest(sample, centroids), n_clusters)
        centroids = np.where(counts[:, None] > 0, means, centroids)
    return _nearest(points, centroids)


class ClusteredItems:
    """Items ``rows`` (with their ``vectors`` and ranking ``biases``) grouped for pruned exact search."""

    def __init__(self, vectors: np.ndarray, biases: np.ndarray, rows: np.ndarray) -> None:
        n = len(rows)
        n_clusters = max(1, n // _ITEMS_PER_CLUSTER)
        labels = _kmeans(vectors, n_clusters, _KMEANS_ITERATIONS) if n_clusters > 1 else np.zeros(n, np.int64)
        order = np.argsort(labels, kind="stable")
        labels = labels[order]
        self.vectors = np.ascontiguousarray(vectors[order], dtype=np.float32)
        self.biases = np.ascontiguousarray(biases[order], dtype=np.float32)
        self.rows = np.ascontiguousarray(rows[order], dtype=np.int64)
        self.centroids, counts = _centroids(self.vectors, labels, n_clusters)
        self.starts = np.zeros(n_clusters + 1, dtype=np.int64)
        np.cumsum(counts, out=self.starts[1:])
        # Members are contiguous per cluster: per-cluster maxima by reduceat over the non-empty ones.
        filled = np.flatnonzero(counts)
        self.max_bias = np.full(n_clusters, -np.inf, dtype=np.float32)
        self.max_bias[filled] = np.maximum.reduceat(self.biases, self.starts[filled])
        self.radius = np.zeros(n_clusters, dtype=np.float32)
        offsets = np.linalg.norm(self.vectors - self.centroids[labels], axis=1)
        self.radius[filled] = np.maximum.reduceat(offsets, self.starts[filled])

    def top_k(self, X: np.ndarray, seen_start: np.ndarray, seen_items: np.ndarray, k: int,
              floor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Item rows and scores of each user's ``k`` best items, best first (``-1``/``-inf`` padding).

        ``seen_items[seen_start[n]:seen_start[n + 1]]`` are left out for user ``n``, and so are
        items scoring ``floor[n]`` or less (the clusters below it are not visited).
        """
        X = np.ascontiguousarray(X, dtype=np.float32)
        x_norms = np.sqrt(np.einsum("ij,ij->i", X, X))
        floor = np.full(len(X), -np.inf, np.float32) if floor is None else np.asarray(floor, dtype=np.float32)
        return _pruned_top_k(X, x_norms, self.vectors, self.biases, self.rows, self.starts, self.centroids,
                             self.max_bias, self.radius, seen_start, seen_items, floor, k)
