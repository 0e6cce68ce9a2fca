"""Neighbourhood over recent sessions: session-kNN (V-SKNN) on a bounded ring, per event.

Sessions live in a ring of ``capacity`` slots (each keeps its last ``length``
distinct items and the time of its last event); each item keeps the serials
of the last ``per_item`` sessions that had it. For the current session
``s = (s_1 .. s_m)`` (oldest first), the neighbours are the ``sample`` most
recent sessions sharing an item with it, their similarity

.. math::

    \\mathrm{sim}(s, n) = \\sum_{i \\in s \\cap n} \\frac{\\mathrm{pos}_s(i)}{m}

(``pos`` the 1-based position of ``i``'s last click in ``s``: later clicks
weigh more), and an item ``x`` scores

.. math::

    \\mathrm{knn}(x) = \\sum_{n \\in \\mathrm{top}_k} \\mathrm{sim}(s, n)
        \\, \\frac{1}{\\mathrm{step}(s, n)} \\, [x \\in n]

where ``step`` is how far back in ``s`` the newest item shared with ``n`` is
(1 = the last click). This is V-SKNN (Ludewig & Jannach 2018) except that
its sessions are the ring's, not all of history. A slot reused by a newer
session invalidates the item entries that point to it by serial number, so
nothing has to be cleaned up; memory is fixed by the three sizes.

>>> from recstream.embeddings.session_knn import RecentSessions  # numba caches by file: compile it
... # under the installed name, as the service does
>>> import numpy as np
>>> ring = RecentSessions(capacity=8, length=4, per_item=4)
>>> for serial, items in enumerate([[0, 1, 2], [0, 3]], start=1):
...     for item in items:
...         ring.add(serial, item, 1000 * serial)
>>> scores = np.zeros(5)
>>> ring.score(np.array([0]), 3, 5, 20, scores)  # a session that clicked item 0
>>> scores.round(3).tolist()  # both earlier sessions are neighbours, sharing item 0
[2.0, 1.0, 1.0, 1.0, 0.0]
"""

from __future__ import annotations

import numpy as np
from recstream.embeddings.item_neighbours import item_mask
from recstream.embeddings.session_kernels import drop_listed, ring_add, ring_score


def drop_items(lists: np.ndarray, lengths: np.ndarray, items: np.ndarray, start: np.ndarray | None = None) -> None:
    """Remove ``items`` from the rows of ``lists`` holding ``min(lengths, width)`` entries each
    from column ``start`` (default 0) on, circularly (in place). The rows that lose one have
    their kept entries moved to columns ``0..``, in their order, and their length set to the count.

    >>> lists, lengths = np.array([[1, 2, 3], [3, 9, 9], [5, 6, 7]], dtype=np.int32), np.array([3, 1, 5])
    >>> drop_items(lists, lengths, np.array([2, 3]), start=np.array([0, 0, 2]))
    >>> lists.tolist(), lengths.tolist()
    ([[1, 0, 0], [0, 0, 0], [5, 6, 7]], [1, 0, 5])
    """
    start = np.zeros(len(lists), dtype=np.int64) if start is None else np.asarray(start, dtype=np.int64)
    drop_listed(lists, lengths, start, item_mask(items))


class RecentSessions:
    """The ring of recent sessions and its item -> session index (see the module docstring)."""

    def __init__(self, capacity: int = 10_000, length: int = 20, per_item: int = 64, sample: int = 1000,
                 k: int = 100) -> None:
        self.sample, self.k = sample, k
        self.items = np.zeros((capacity, length), dtype=np.int32)
        self.lengths = np.zeros(capacity, dtype=np.int32)
        self.times = np.zeros(capacity, dtype=np.int64)
        self.serials = np.full(capacity, -1, dtype=np.int64)
        self.item_serials = np.zeros((1024, per_item), dtype=np.int64)
        self.item_heads = np.zeros(1024, dtype=np.int64)
        self._scratch_items = 0

    def fit(self, items: int) -> None:
        if items > len(self.item_heads):
            size = max(items, 2 * len(self.item_heads))
            serials = np.zeros((size, self.item_serials.shape[1]), dtype=np.int64)
            serials[: len(self.item_serials)] = self.item_serials
            heads = np.zeros(size, dtype=np.int64)
            heads[: len(self.item_heads)] = self.item_heads
            self.item_serials, self.item_heads = serials, heads

    def add(self, serial: int, item: int, t: int) -> None:
        """Session ``serial`` (numbered from 1, increasing) clicked ``item`` at ``t``."""
        self.fit(item + 1)
        ring_add(self.items, self.lengths, self.times, self.serials, self.item_serials, self.item_heads,
                 serial, item, t)

    def forget_items(self, items: np.ndarray) -> None:
        """Take ``items`` (forgotten items) out of every session of the ring (the others keep
        their order) and clear their item -> session index: a new item of the row starts empty."""
        items = np.asarray(items, dtype=np.int64)
        drop_items(self.items, self.lengths, items)
        items = items[items < len(self.item_heads)]
        self.item_serials[items] = 0
        self.item_heads[items] = 0

    def score(self, session: np.ndarray, own_serial: int, n_items: int, max_session: int, out: np.ndarray) -> None:
        """Add the kNN scores of ``session`` (its last ``max_session`` clicks) to ``out`` (one per item)."""
        self.fit(n_items)
        scratch = self.scratch(n_items, max_session)
        touched, tmark, n_touched = np.zeros(len(out), np.int64), np.zeros(len(out), np.int64), np.zeros(1, np.int64)
        ring_score(self.items, self.lengths, self.times, self.serials, self.item_serials, self.item_heads,
                   np.asarray(session, dtype=np.int64)[-max_session:], own_serial, self.sample, self.k, out,
                   touched, tmark, 1, n_touched, *scratch)

    def scratch(self, n_items: int, max_session: int) -> tuple[np.ndarray, ...]:
        """Work arrays for ``ring_score`` (kept: they are marked, never cleared)."""
        n_items = max(n_items, len(self.item_heads))
        if self._scratch_items < n_items or len(self._scratch[4]) < max_session * self.item_serials.shape[1]:
            self._scratch = self.new_scratch(n_items, max_session)
            self._scratch_items = n_items
        return self._scratch

    def new_scratch(self, n_items: int, max_session: int) -> tuple[np.ndarray, ...]:
        """A further set of ``ring_score`` work arrays, for another thread."""
        n_items = max(n_items, len(self.item_heads))
        cand = max_session * self.item_serials.shape[1]
        return (np.zeros(n_items, np.float64), np.zeros(n_items, np.int64), np.zeros(len(self.lengths), np.int64),
                np.zeros(cand, np.int64), np.zeros(cand, np.int64), np.zeros(cand, np.float64), np.zeros(1, np.int64))

    def bytes_per_item(self) -> int:
        return self.item_serials.itemsize * self.item_serials.shape[1] + self.item_heads.itemsize

    def to_arrays(self, items: int) -> dict[str, np.ndarray]:
        return {"items": self.items.copy(), "lengths": self.lengths.copy(), "times": self.times.copy(),
                "serials": self.serials.copy(), "item_serials": self.item_serials[:items].copy(),
                "item_heads": self.item_heads[:items].copy()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays["items"].shape != self.items.shape or arrays["item_serials"].shape[1] != self.item_serials.shape[1]:
            return  # resized ring: it refills from the stream within a few thousand sessions
        self.items, self.lengths = arrays["items"].astype(np.int32), arrays["lengths"].astype(np.int32)
        self.times, self.serials = arrays["times"].astype(np.int64), arrays["serials"].astype(np.int64)
        n = len(arrays["item_heads"])
        self.item_serials = np.zeros((max(n, 1024), self.item_serials.shape[1]), dtype=np.int64)
        self.item_heads = np.zeros(max(n, 1024), dtype=np.int64)
        self.item_serials[:n] = arrays["item_serials"]
        self.item_heads[:n] = arrays["item_heads"]
        self._scratch_items = 0
