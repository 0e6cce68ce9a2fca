"""What each user interacted with recently, to keep it out of their recommendations.

The doctests import from ``recstream.``: pytest's doctest collection imports this file as
``embeddings.history``, and a kernel first compiled there is cached on disk under that name,
which a process importing ``recstream`` cannot load.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Empty table slots hold -1 (a literal in the kernels: a global would tie numba's on-disk cache to
# the name the module was first imported under).


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, inline="always")
def _slot(key, mask):
    """Start of ``key``'s probe sequence (splitmix64 finaliser)."""
    z = np.uint64(key) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return np.int64(z & np.uint64(mask))


@njit(cache=True, inline="always")
def _delete(keys, values, key):
    """Remove ``key`` from the linear-probing table, shifting later entries back (no tombstones)."""
    mask = len(keys) - 1
    s = _slot(key, mask)
    while keys[s] != key:
        s = (s + 1) & mask
    while True:
        keys[s] = -1
        nxt = (s + 1) & mask
        while True:
            if keys[nxt] == -1:
                return
            home = _slot(keys[nxt], mask)
            # Move the entry at nxt back to s unless its home lies cyclically in (s, nxt].
            if (nxt > s and (home <= s or home > nxt)) or (nxt < s and (home <= s and home > nxt)):
                break
            nxt = (nxt + 1) & mask
        keys[s] = keys[nxt]
        values[s] = values[nxt]
        s = nxt


@njit(cache=True)
def _add(users, items, start, limit, head, tail, count, entry_item, entry_next, free, counters, keys, values):
    """Record events ``start..`` in order; returns where it stopped (``len(users)``: all done).

    It stops early when the entry pool or the table is full: the caller grows them and resumes.
    ``counters`` = [entries used, free-list size, keys in the table].
    """
    mask = len(keys) - 1
    for n in range(start, len(users)):
        if counters[0] >= len(entry_item) and counters[1] == 0 or 2 * (counters[2] + 1) > len(keys):
            return n
        u, i = users[n], items[n]
        key = (u << 32) | i
        s = _slot(key, mask)
        while keys[s] != -1 and keys[s] != key:
            s = (s + 1) & mask
        if keys[s] == key:
            continue  # already remembered: order is by first interaction
        if counters[1] > 0:
            counters[1] -= 1
            e = free[counters[1]]
        else:
            e = counters[0]
            counters[0] += 1
        entry_item[e] = i
        entry_next[e] = -1
        keys[s] = key
        values[s] = e
        counters[2] += 1
        if count[u] == 0:
            head[u] = e
        else:
            entry_next[tail[u]] = e
        tail[u] = e
        count[u] += 1
        if count[u] > limit:  # forget the item first interacted with longest ago
            old = head[u]
            head[u] = entry_next[old]
            _delete(keys, values, (u << 32) | entry_item[old])
            counters[2] -= 1
            free[counters[1]] = old
            counters[1] += 1
            count[u] -= 1
    return len(users)


@njit(cache=True)
def _collect(user_rows, head, count, entry_item, entry_next):
    """(position in ``user_rows``, item) of every remembered interaction, oldest first per user."""
    total = 0
    for u in user_rows:
        if u < len(count):
            total += count[u]
    at = np.empty(total, dtype=np.int64)
    out = np.empty(total, dtype=np.int64)
    n = 0
    for p in range(len(user_rows)):
        u = user_rows[p]
        if u >= len(count):
            continue
        e = head[u]
        for _ in range(count[u]):
            at[n] = p
            out[n] = entry_item[e]
            e = entry_next[e]
            n += 1
    return at, out


class InteractionHistory:
    """The last ``max_per_user`` distinct items of each user, in order of first interaction.

    Users' lists are linked lists in flat arrays, with an open-addressing table of
    (user, item) pairs for membership: a batch is recorded in one compiled call, and a
    million users cost tens of bytes per remembered item, not a Python dict each.

    >>> from recstream.embeddings.history import InteractionHistory  # see the note at the top
    >>> h = InteractionHistory(max_per_user=2)
    >>> h.add(np.array([0, 0, 0, 0]), np.array([5, 6, 5, 7]))
    >>> h.items_of(0).tolist(), h.items_of(1).tolist()
    ([6, 7], [])
    """

    def __init__(self, max_per_user: int = 500) -> None:
        self.max_per_user = max_per_user
        self._head = np.zeros(0, dtype=np.int64)
        self._tail = np.zeros(0, dtype=np.int64)
        self._count = np.zeros(0, dtype=np.int64)
        self._entry_item = np.zeros(1024, dtype=np.int64)
        self._entry_next = np.zeros(1024, dtype=np.int64)
        self._free = np.zeros(1024, dtype=np.int64)
        self._counters = np.zeros(3, dtype=np.int64)  # entries used, free entries, keys
        self._keys = np.full(2048, -1, dtype=np.int64)
        self._values = np.zeros(2048, dtype=np.int64)

    def add(self, user_rows: np.ndarray, item_rows: np.ndarray) -> None:
        if self.max_per_user == 0 or len(user_rows) == 0:
            return
        users = np.ascontiguousarray(user_rows, dtype=np.int64)
        items = np.ascontiguousarray(item_rows, dtype=np.int64)
        self._fit_users(int(users.max()) + 1)
        done = 0
        while done < len(users):
            done = _add(users, items, done, self.max_per_user, self._head, self._tail, self._count,
                        self._entry_item, self._entry_next, self._free, self._counters, self._keys, self._values)
            if done < len(users):
                self._grow(len(users) - done)

    def _fit_users(self, n: int) -> None:
        if n > len(self._count):
            size = max(n, 2 * len(self._count), 1024)
            for name in ("_head", "_tail", "_count"):
                grown = np.zeros(size, dtype=np.int64)
                old = getattr(self, name)
                grown[: len(old)] = old
                setattr(self, name, grown)

    def _grow(self, more: int) -> None:
        used = int(self._counters[0])
        if used + more > len(self._entry_item):
            size = max(2 * len(self._entry_item), used + more)
            for name in ("_entry_item", "_entry_next", "_free"):
                grown = np.zeros(size, dtype=np.int64)
                old = getattr(self, name)
                grown[: len(old)] = old
                setattr(self, name, grown)
        if 2 * (int(self._counters[2]) + more) > len(self._keys):
            self._rehash(max(2 * len(self._keys), 1 << (4 * (int(self._counters[2]) + more)).bit_length()))

    def _rehash(self, size: int) -> None:
        live = self._keys != -1
        keys, values = self._keys[live], self._values[live]
        self._keys = np.full(size, -1, dtype=np.int64)
        self._values = np.zeros(size, dtype=np.int64)
        _insert_all(self._keys, self._values, keys, values)

    def items_of(self, user_row: int) -> np.ndarray:
        """The user's remembered items, oldest first."""
        return self.pairs(np.array([user_row], dtype=np.int64))[1]

    def pairs(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``user_rows``, item row) of every remembered interaction of those users.

        >>> from recstream.embeddings.history import InteractionHistory
        >>> h = InteractionHistory()
        >>> h.add(np.array([3, 3, 4]), np.array([1, 2, 9]))
        >>> [a.tolist() for a in h.pairs(np.array([4, 3]))]
        [[0, 1, 1], [9, 1, 2]]
        """
        return _collect(np.ascontiguousarray(user_rows, dtype=np.int64), self._head, self._count,
                        self._entry_item, self._entry_next)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """CSR form: users, where each one's items end, and the items (oldest first)."""
        users = np.flatnonzero(self._count)
        _, items = self.pairs(users)
        return {"users": users, "ends": np.cumsum(self._count[users]), "items": items}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`to_arrays`.

        >>> from recstream.embeddings.history import InteractionHistory
        >>> h = InteractionHistory()
        >>> h.add(np.array([1, 1, 2]), np.array([5, 6, 7]))
        >>> g = InteractionHistory()
        >>> g.load_arrays(h.to_arrays())
        >>> g.items_of(1).tolist(), g.items_of(2).tolist()
        ([5, 6], [7])
        """
        ends = np.asarray(arrays["ends"], dtype=np.int64)
        counts = np.diff(np.concatenate([[0], ends]))
        self.__init__(self.max_per_user)
        self.add(np.repeat(np.asarray(arrays["users"], dtype=np.int64), counts),
                 np.asarray(arrays["items"], dtype=np.int64))


@njit(cache=True)
def _insert_all(keys, values, new_keys, new_values):
    mask = len(keys) - 1
    for n in range(len(new_keys)):
        s = _slot(new_keys[n], mask)
        while keys[s] != -1:
            s = (s + 1) & mask
        keys[s] = new_keys[n]
        values[s] = new_values[n]
