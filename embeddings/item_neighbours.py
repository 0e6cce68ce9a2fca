"""Exact, decayed item-to-item weights with a bounded number of neighbours per item.

Each item ``y`` keeps at most ``n`` neighbours ``x`` with a weight

.. math::

    W_{y \\to x}(t) = \\sum_{e} g_e \\, 2^{-(t - t_e) / h}

the sum of the gains ``g_e`` of every pair ``y -> x`` learned at event time
``t_e``, halved every ``h`` of event time (``h = 0``: no decay). Counting is
exact while ``y`` has at most ``n`` neighbours; past that, a row is pruned by
space-saving (Metwally et al. 2005): a new neighbour takes the slot of the one
with the smallest upper bound and inherits that bound as its possible error.
Pairs are ranked by their lower bound (the weight learned since they got the
slot), evicted by their upper bound, so a frequent pair always gets in and a
flood of one-off pairs cannot push it out nor outrank it. A row never holds
more than ``n`` pairs: memory is ``n * 12`` bytes per item, however many arrive.

Decay costs nothing per pair: weights are stored in units of
``2^{(t_e - t_0) / h}`` for a reference time ``t_0`` (a gain learned later is
stored larger), so old pairs fall behind new ones without being touched; only
ratios between weights matter when ranking. When the stored scale grows past
``2^30``, every weight is rescaled once and ``t_0`` moves forward.

Two uses (see embeddings.session): sequential rules, where ``y -> x`` gains
``1 / gap`` when ``x`` follows ``y`` within a session (session-rec's SR), and
session co-occurrence, both directions, gain 1.

>>> from recstream.embeddings.item_neighbours import ItemNeighbours  # numba caches by file: compile it
... # under the installed name, as the service does
>>> import numpy as np
>>> rules = ItemNeighbours(n=2)
>>> rules.add(np.array([0, 0, 0, 0]), np.array([1, 1, 2, 3]), np.array([1.0, 0.5, 1.0, 2.0]), np.zeros(4, np.int64))
>>> rows, weights = rules.neighbours(0)
>>> sorted(zip(rows.tolist(), weights.tolist()))  # 2 (the weakest, 1.0 against 1.5) made room for 3
[(1, 1.5), (3, 2.0)]
>>> rules.errors[0].tolist()  # 3 may have had 2's weight before: its upper bound is 3.0
[0.0, 1.0]
"""

from __future__ import annotations

import numpy as np
from recstream.embeddings.session_kernels import add_pairs, drop_neighbours


def item_mask(items: np.ndarray) -> np.ndarray:
    """A boolean mask over item rows, set at ``items`` (what the forgetting kernels take)."""
    items = np.asarray(items, dtype=np.int64)
    mask = np.zeros(int(items.max(initial=-1)) + 1, dtype=bool)
    mask[items] = True
    return mask


class ItemNeighbours:
    """Top-``n`` decayed pair weights per item row (see the module docstring); rows grow with the items."""

    def __init__(self, n: int = 32, half_life_s: float = 0.0) -> None:
        self.n = n
        self.half_life_ms = half_life_s * 1000.0
        self.rows = np.full((1024, n), -1, dtype=np.int32)
        self.weights = np.zeros((1024, n), dtype=np.float32)
        self.errors = np.zeros((1024, n), dtype=np.float32)
        self.clock = np.zeros(1, dtype=np.float64)  # reference event time of the stored weights

    def fit(self, items: int) -> None:
        """Room for item rows below ``items`` (capacity doubles)."""
        if items > len(self.rows):
            size = max(items, 2 * len(self.rows))
            rows = np.full((size, self.n), -1, dtype=np.int32)
            weights = np.zeros((size, self.n), dtype=np.float32)
            errors = np.zeros((size, self.n), dtype=np.float32)
            rows[: len(self.rows)] = self.rows
            weights[: len(self.weights)] = self.weights
            errors[: len(self.errors)] = self.errors
            self.rows, self.weights, self.errors = rows, weights, errors

    def add(self, ys: np.ndarray, xs: np.ndarray, gains: np.ndarray, ts: np.ndarray) -> None:
        """Learn pairs ``ys[e] -> xs[e]`` with ``gains[e]`` at event times ``ts[e]`` (ms), in order."""
        self.fit(int(max(ys.max(initial=-1), xs.max(initial=-1))) + 1)
        add_pairs(self.rows, self.weights, self.errors, self.clock, self.half_life_ms, ys.astype(np.int64), xs.astype(np.int64),
                 gains.astype(np.float64), ts.astype(np.float64))

    def forget(self, items: np.ndarray) -> None:
        """Clear the rows of ``items`` (forgotten items) and take them out of every other row's
        neighbours; the others keep their order, free slots last (the kernel relies on it).

        >>> t = ItemNeighbours(n=3)
        >>> t.add(np.array([0, 0, 0, 1]), np.array([1, 2, 3, 0]), np.ones(4), np.zeros(4, np.int64))
        >>> t.forget(np.array([2, 1]))
        >>> t.rows[0].tolist(), t.rows[1].tolist()
        ([3, -1, -1], [-1, -1, -1])
        """
        drop_neighbours(self.rows, self.weights, self.errors, item_mask(items))

    def neighbours(self, y: int) -> tuple[np.ndarray, np.ndarray]:
        """``y``'s neighbour rows and weights (lower bounds; in the stored scale: compare them, don't
        read them as counts when decay is on)."""
        if y >= len(self.rows):
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        keep = self.rows[y] >= 0
        return self.rows[y][keep], (self.weights[y] - self.errors[y])[keep]

    def bytes_per_item(self) -> int:
        return (self.rows.itemsize + self.weights.itemsize + self.errors.itemsize) * self.n

    def to_arrays(self, items: int) -> dict[str, np.ndarray]:
        return {"rows": self.rows[:items].copy(), "weights": self.weights[:items].copy(),
                "errors": self.errors[:items].copy(), "clock": self.clock.copy()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        rows, weights = np.asarray(arrays["rows"], np.int32), np.asarray(arrays["weights"], np.float32)
        errors = np.asarray(arrays["errors"], np.float32)
        if rows.shape[1] != self.n:  # a changed neighbour count: keep each item's strongest
            order = np.argsort(-np.where(rows >= 0, weights - errors, -np.inf), axis=1, kind="stable")[:, : self.n]
            rows, weights, errors = (np.take_along_axis(a, order, 1) for a in (rows, weights, errors))
            pad = ((0, 0), (0, max(self.n - rows.shape[1], 0)))
            rows, weights, errors = np.pad(rows, pad, constant_values=-1), np.pad(weights, pad), np.pad(errors, pad)
        size = max(len(rows), 1024)
        self.rows = np.full((size, self.n), -1, dtype=np.int32)
        self.weights = np.zeros((size, self.n), dtype=np.float32)
        self.errors = np.zeros((size, self.n), dtype=np.float32)
        self.rows[: len(rows)], self.weights[: len(rows)], self.errors[: len(rows)] = rows, weights, errors
        self.clock = np.array(arrays["clock"], dtype=np.float64).reshape(1)
