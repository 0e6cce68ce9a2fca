"""What each user interacted with recently, to keep it out of their recommendations."""

from __future__ import annotations

import numpy as np
from numba import njit
from recstream.embeddings.item_neighbours import item_mask


@njit(cache=True, nogil=True)
def _add(users, items, start, length, cap, pool, top, order, n_order, limit):  # pragma: no cover (compiled)
    """Add events in order until the pool has no room for a user's grown block.

    Returns (events done, new pool top, new count of users in ``order``).
    """
    for k in range(len(users)):
        u, i = users[k], items[k]
        n, s = length[u], start[u]
        seen = False
        for j in range(n):
            if pool[s + j] == i:
                seen = True
                break
        if seen:
            continue
        first = n == 0 and cap[u] == 0  # the user's first item: the user joins ``order`` once stored
        if n < cap[u]:
            pool[s + n] = i
            length[u] = n + 1
        elif n < limit:  # a block twice as large at the end of the pool (amortised O(1) per item)
            grown = min(max(4, 2 * cap[u]), limit)
            if top + grown > len(pool):
                return k, top, n_order
            pool[top:top + n] = pool[s:s + n]
            pool[top + n] = i
            start[u], cap[u], length[u] = top, grown, n + 1
            top += grown
        else:  # full: forget the item first interacted with longest ago
            pool[s:s + n - 1] = pool[s + 1:s + n]
            pool[s + n - 1] = i
        if first:  # after the early return above: a batch resumed there must not list the user twice
            order[n_order] = u
            n_order += 1
    return len(users), top, n_order


@njit(cache=True, nogil=True)
def _drop_items(users, start, length, pool, gone):  # pragma: no cover (compiled)
    """Remove the items ``x`` with ``gone[x]`` from the blocks of ``users``, in place, keeping order."""
    for u in users:
        s, n = start[u], length[u]
        w = 0
        for j in range(n):
            x = pool[s + j]
            if not (x < len(gone) and gone[x]):
                pool[s + w] = x
                w += 1
        length[u] = w


class InteractionHistory:
    """The last ``max_per_user`` distinct items of each user, in order of first interaction.

    Kept in flat arrays (a block of the pool per user, grown by doubling) and updated by a compiled
    loop: a replay adds millions of events, and a Python dict per user cost a third of the update.

    >>> h = InteractionHistory(max_per_user=2)
    >>> h.add(np.array([0, 0, 0, 0]), np.array([5, 6, 5, 7]))
    >>> list(h.items_of(0)), list(h.items_of(1))
    ([6, 7], [])
    """

    def __init__(self, max_per_user: int = 500) -> None:
        self.max_per_user = max_per_user
        self._start = np.zeros(1024, dtype=np.int64)  # per user row: where its block starts in the pool
        self._length = np.zeros(1024, dtype=np.int64)  # items held
        self._cap = np.zeros(1024, dtype=np.int64)  # size of its block (0: none yet)
        self._pool = np.zeros(1 << 16, dtype=np.int64)
        self._top = 0  # pool in use (blocks left behind by a user's growth included)
        self._order = np.zeros(1024, dtype=np.int64)  # users in order of their first item
        self._n_order = 0

    def _fit_users(self, needed: int) -> None:
        if needed > len(self._start):
            size = max(needed, 2 * len(self._start))
            for name in ("_start", "_length", "_cap", "_order"):
                old = getattr(self, name)
                grown = np.zeros(size, dtype=np.int64)
                grown[: len(old)] = old
                setattr(self, name, grown)

    def add(self, user_rows: np.ndarray, item_rows: np.ndarray) -> None:
        if len(user_rows) == 0:
            return
        users = np.ascontiguousarray(user_rows, dtype=np.int64)
        items = np.ascontiguousarray(item_rows, dtype=np.int64)
        self._fit_users(int(users.max()) + 1)
        done = 0
        while done < len(users):
            n, self._top, self._n_order = _add(users[done:], items[done:], self._start, self._length, self._cap,
                                               self._pool, self._top, self._order, self._n_order,
                                               max(self.max_per_user, 1))  # a user keeps at least its last item
            done += n
            if done < len(users):  # room for at least the largest block a user can grow to
                grown = np.zeros(2 * len(self._pool) + 2 * max(self.max_per_user, 4), dtype=np.int64)
                grown[: self._top] = self._pool[: self._top]
                self._pool = grown

    def forget(self, user_rows: np.ndarray) -> None:
        """Drop the items of ``user_rows`` (forgotten users: their rows go to new users).

        Their blocks are abandoned; once the pool is mostly abandoned blocks it is compacted,
        so that churning users does not grow it without bound."""
        rows = np.asarray(user_rows, dtype=np.int64)
        rows = rows[rows < len(self._start)]
        if len(rows) == 0:
            return
        self._length[rows] = 0
        self._cap[rows] = 0  # a new user of the row starts a block of its own, and joins ``_order`` again
        order = self._order[: self._n_order]
        kept = order[self._length[order] > 0]
        self._order[: len(kept)] = kept
        self._n_order = len(kept)
        if self._top > 4 * int(self._length.sum()) + (1 << 16):
            self.load_arrays(self.to_arrays())

    def forget_items(self, item_rows: np.ndarray) -> None:
        """Drop ``item_rows`` (forgotten items: their rows go to new items) from every user's
        history, keeping the order of the rest: a new item of the row is not "seen" by anyone.
        One compiled pass over all histories, paid once per eviction; a user left with none
        leaves ``_order`` as a forgotten user does (and joins it again with their next item).

        >>> h = InteractionHistory()
        >>> h.add(np.array([0, 0, 1, 0]), np.array([5, 6, 6, 7]))
        >>> h.forget_items(np.array([6]))
        >>> list(h.items_of(0)), list(h.items_of(1))
        ([5, 7], [])
        """
        users = self._order[: self._n_order]
        _drop_items(users, self._start, self._length, self._pool, item_mask(item_rows))
        emptied = users[self._length[users] == 0]
        if len(emptied):
            self.forget(emptied)

    def _items(self, user_row: int) -> np.ndarray:
        if user_row >= len(self._start):
            return self._pool[:0]
        start = self._start[user_row]
        return self._pool[start:start + self._length[user_row]]

    def items_of(self, user_row: int) -> dict[int, None]:
        """The user's recent items (a dict used as an ordered set)."""
        return dict.fromkeys(self._items(user_row).tolist())

    def gather(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per user of ``user_rows``, how many items it holds, and those items one user after the other."""
        user_rows = np.asarray(user_rows, dtype=np.int64)
        known = user_rows < len(self._start)
        counts = np.where(known, self._length[np.where(known, user_rows, 0)], 0)
        starts = self._start[np.where(known, user_rows, 0)]
        ends = np.cumsum(counts)
        offsets = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)
        return counts, self._pool[np.repeat(starts, counts) + offsets]

    def pairs(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``user_rows``, item row) of every remembered interaction of those users.

        >>> h = InteractionHistory()
        >>> h.add(np.array([3, 3, 4]), np.array([1, 2, 9]))
        >>> [a.tolist() for a in h.pairs(np.array([4, 3]))]
        [[0, 1, 1], [9, 1, 2]]
        """
        counts, items = self.gather(user_rows)
        return np.repeat(np.arange(len(counts)), counts), items

    def to_arrays(self) -> dict[str, np.ndarray]:
        """CSR form: users (in order of their first item), where each one's items end, and the items (oldest first)."""
        users = self._order[: self._n_order].copy()
        counts, items = self.gather(users)
        return {"users": users, "ends": np.cumsum(counts), "items": items}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`to_arrays`.

        >>> h = InteractionHistory()
        >>> h.add(np.array([1, 1, 2]), np.array([5, 6, 7]))
        >>> g = InteractionHistory()
        >>> g.load_arrays(h.to_arrays())
        >>> list(g.items_of(1)), list(g.items_of(2))
        ([5, 6], [7])
        """
        users = np.asarray(arrays["users"], dtype=np.int64)
        ends = np.asarray(arrays["ends"], dtype=np.int64)
        items = np.asarray(arrays["items"], dtype=np.int64)
        self.__init__(self.max_per_user)
        self._fit_users(int(users.max()) + 1 if len(users) else 0)
        counts = np.diff(ends, prepend=0)
        self._start[users], self._length[users], self._cap[users] = ends - counts, counts, counts
        self._pool = np.zeros(max(2 * len(items), 1 << 16), dtype=np.int64)
        self._pool[: len(items)] = items
        self._top = len(items)
        self._order[: len(users)] = users
        self._n_order = len(users)
