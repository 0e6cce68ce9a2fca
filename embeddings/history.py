"""What each user interacted with recently, to keep it out of their recommendations."""

from __future__ import annotations

from itertools import chain

import numpy as np


class InteractionHistory:
    """The last ``max_per_user`` distinct items of each user, in order of first interaction.

    >>> h = InteractionHistory(max_per_user=2)
    >>> h.add(np.array([0, 0, 0, 0]), np.array([5, 6, 5, 7]))
    >>> list(h.items_of(0)), list(h.items_of(1))
    ([6, 7], [])
    """

    def __init__(self, max_per_user: int = 500) -> None:
        self.max_per_user = max_per_user
        self._items: dict[int, dict[int, None]] = {}

    def add(self, user_rows: np.ndarray, item_rows: np.ndarray) -> None:
        items = self._items
        get = items.get
        limit = self.max_per_user
        for u, i in zip(user_rows.tolist(), item_rows.tolist()):
            recent = get(u)
            if recent is None:
                items[u] = {i: None}
            elif i not in recent:
                recent[i] = None
                if len(recent) > limit:  # forget the item first interacted with longest ago
                    del recent[next(iter(recent))]

    def items_of(self, user_row: int) -> dict[int, None]:
        """The user's recent items (a dict used as an ordered set)."""
        return self._items.get(user_row, {})

    def pairs(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``user_rows``, item row) of every remembered interaction of those users.

        >>> h = InteractionHistory()
        >>> h.add(np.array([3, 3, 4]), np.array([1, 2, 9]))
        >>> [a.tolist() for a in h.pairs(np.array([4, 3]))]
        [[0, 1, 1], [9, 1, 2]]
        """
        get, empty = self._items.get, {}
        lists = [get(u, empty) for u in user_rows.tolist()]
        counts = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        items = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(counts.sum()))
        return np.repeat(np.arange(len(lists)), counts), items

    def to_arrays(self) -> dict[str, np.ndarray]:
        """CSR form: users, where each one's items start, and the items (oldest first)."""
        users = np.fromiter(self._items.keys(), dtype=np.int64, count=len(self._items))
        counts = np.fromiter(map(len, self._items.values()), dtype=np.int64, count=len(self._items))
        items = np.fromiter((i for s in self._items.values() for i in s), dtype=np.int64, count=int(counts.sum()))
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
        items = arrays["items"].tolist()
        starts = [0, *arrays["ends"][:-1].tolist()]
        self._items = {u: dict.fromkeys(items[a:b])
                       for u, a, b in zip(arrays["users"].tolist(), starts, arrays["ends"].tolist())}
