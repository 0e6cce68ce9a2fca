"""Bounded memory for users and items: expiry after a time without events, and a cap with
least-recently-active eviction (Monolith's feature expiry and eviction). One :class:`Expiry` per
id table: users (``model.max_users``, ``user_ttl_s``) and items (``model.max_items``, ``item_ttl_s``);
"row" below is a user or an item.

Both are decided at points of the event sequence, never at batch boundaries, so the same events
in the same order forget the same rows however they are cut into batches (and a replay after a
crash ends in the state an uninterrupted run reaches):

- **expiry** (``*_ttl_s``): the clock is the largest event time applied. Each time it
  passes the next sweep time (sweeps are ``ttl_s / SWEEPS_PER_TTL`` apart), before the
  event that moved it, every row whose latest event is more than ``ttl_s`` older than the
  clock is forgotten. A row is thus kept at least ``ttl_s`` and at most
  ``ttl_s * (1 + 1 / SWEEPS_PER_TTL)`` after its last event (in event time), and a sweep
  is one vectorised pass over the rows, not a per-event cost.
- **cap** (``max_*``): before the event that would hold one id more than the cap, the least
  recently active rows (by their latest event's place in the input, not its time: a producer's
  clock cannot protect an id) are forgotten, ``EVICT_SHARE`` of the cap at once, so the
  eviction's sort runs once per that many new ids.

Forgetting is :meth:`stream.state.RecState.forget_users` and
:meth:`embeddings.model.OnlineMF.forget_items`: every array kept per row is reset to a new id's,
and the row goes to the next new id.
"""

from __future__ import annotations

import math

import numpy as np
from recstream.embeddings.ids import CodedIds, IdMap

# Sweeps per TTL: a row outlives its TTL by at most 1/SWEEPS_PER_TTL of it.
SWEEPS_PER_TTL = 16
# Share of the cap forgotten at once when it is reached: the eviction's O(rows log rows) sort
# is paid once per this many new ids, and the cap is held to within it.
EVICT_SHARE = 0.02


def least_recently_active(last_seq: np.ndarray, held: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` rows of ``held`` (ascending) with the smallest ``last_seq``; ties: lowest row first.

    >>> least_recently_active(np.array([5, 0, 3, 0, 9]), np.array([0, 1, 2, 3, 4]), 3).tolist()
    [1, 3, 2]
    """
    if n >= len(held):
        return held.copy()
    order = np.argsort(last_seq[held], kind="stable")  # stable: ties keep row order
    return held[order[:n]]


def part(keys, start: int, end: int):
    """Events ``start:end`` of an id column (a list or :class:`CodedIds`)."""
    if start == 0 and end == len(keys):
        return keys
    if isinstance(keys, CodedIds):
        return keys.kept(slice(start, end))
    return keys[start:end]


class Expiry:
    """Where in a run of events the ids of one table (users, or items) must be forgotten, and which
    (see the module docstring).

    >>> from recstream.embeddings.ids import IdMap
    >>> expiry = Expiry(max_rows=2, ttl_s=0)
    >>> ids = IdMap(["a", "b"])
    >>> expiry.run_end(ids, ["a", "c", "d"], np.zeros(3, np.int64), 0)  # "c" would be a third user
    1
    >>> last_active, last_seq = np.zeros(2, np.int64), np.array([7, 3])  # "b" was last active earlier
    >>> expiry.to_forget(ids, last_active, last_seq, ["c"], np.zeros(1, np.int64), 0).tolist()
    [1]
    """

    def __init__(self, max_rows: int = 0, ttl_s: float = 0.0) -> None:
        self.max_rows = max_rows
        self.ttl_ms = int(round(ttl_s * 1000))
        self.period_ms = max(self.ttl_ms // SWEEPS_PER_TTL, 1)
        self.batch = max(1, math.ceil(EVICT_SHARE * max_rows))
        self.clock = 0  # the largest event time applied (epoch ms)
        self.next_sweep = 0  # the clock at which the next expiry sweep runs

    @property
    def enabled(self) -> bool:
        return self.max_rows > 0 or self.ttl_ms > 0

    def run_end(self, ids: IdMap, keys, ts: np.ndarray, start: int) -> int:
        """The end of the run of events from ``start`` that forgets no one: the first event after
        ``start`` that moves the clock to the next sweep, or that adds an id over the cap."""
        end = len(keys)
        if self.ttl_ms:
            moved = np.flatnonzero(ts[start + 1:] >= self.next_sweep)
            if len(moved):
                end = start + 1 + int(moved[0])
        if self.max_rows and ids.live + (end - start) > self.max_rows:
            end = start + ids.new_id_positions(part(keys, start, end), max(self.max_rows - ids.live, 0))
        return end

    def to_forget(self, ids: IdMap, last_active: np.ndarray, last_seq: np.ndarray, keys, ts: np.ndarray,
                  start: int) -> np.ndarray:
        """Rows to forget before event ``start`` (ascending); moves the clock to that event."""
        forget = np.zeros(0, dtype=np.int64)
        held = None
        if self.ttl_ms:
            self.clock = max(self.clock, int(ts[start]))
            if self.clock >= self.next_sweep:
                self.next_sweep = self.clock + self.period_ms
                held = _held(ids)
                forget = held[last_active[held] < self.clock - self.ttl_ms]
        if self.max_rows and ids.get(_text(keys[start])) is None and ids.live - len(forget) >= self.max_rows:
            held = _held(ids) if held is None else held
            if len(forget):
                held = held[~np.isin(held, forget, assume_unique=True)]
            over = len(held) + 1 - self.max_rows
            forget = np.union1d(forget, least_recently_active(last_seq, held, max(over, self.batch)))
        return forget

    def over_cap(self, ids: IdMap, last_seq: np.ndarray, added: np.ndarray) -> np.ndarray:
        """Rows to forget now for the table to be within the cap, for ids just ``added`` (rows, in
        the order they came) outside the event sequence (items announced by their metadata): the
        least recently active of the others first (``EVICT_SHARE`` of the cap at least, as at
        events), then, if those alone are over the cap, the first added.

        >>> Expiry(max_rows=2).over_cap(IdMap(["a", "b", "c"]), np.array([5, 3, 9]), np.array([2])).tolist()
        [1]
        >>> Expiry(max_rows=1).over_cap(IdMap(["a", "b", "c"]), np.array([5, 5, 5]), np.array([2, 1])).tolist()
        [0, 2]
        """
        held = _held(ids)
        over = len(held) - self.max_rows
        if not self.max_rows or over <= 0:
            return np.zeros(0, dtype=np.int64)
        added = np.asarray(added, dtype=np.int64)
        others = held[~np.isin(held, added)]
        forget = least_recently_active(last_seq, others, max(over, self.batch))
        if len(forget) < over:
            added = added[np.sort(np.unique(added, return_index=True)[1])]  # (an id given twice counts once)
            forget = np.concatenate([forget, added[: over - len(forget)]])
        return np.sort(forget)

    def advance(self, ts: np.ndarray) -> None:
        """Events with times ``ts`` were applied: the clock is at least their latest."""
        if len(ts):
            self.clock = max(self.clock, int(ts.max()))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"state": np.array([self.clock, self.next_sweep], dtype=np.int64)}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.clock, self.next_sweep = (int(x) for x in arrays["state"])


def _held(ids: IdMap) -> np.ndarray:
    held = np.ones(len(ids), dtype=bool)
    held[ids.free] = False
    return np.flatnonzero(held)


def _text(key: object) -> str:
    return key if key.__class__ is str else str(key)
