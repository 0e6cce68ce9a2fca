"""Recommendation updates: which users are due one, when the next round is, and the messages.

Updates are coalesced: a user touched several times between two rounds gets one update, made
from their state at the round. Rounds are ``output.flush_interval_s`` apart while the consumer
keeps up, and each publishes every pending user it can within one interval (the rest go first
in the next round). While it is behind (its last poll came back
full: a backlog, a catch-up, a replayed topic), publishing gets at most ``max_publish_share`` of
the time: a round publishes the longest-waiting users for as long as its budget lasts,
``share / (1 - share)`` times the time spent consuming since the previous round, and the rest
stay pending, gathering their later events, for the next round. The more a consumer is behind,
the more events each update covers; each user still gets an update with their final state once
the backlog is read. A consumer that has caught up publishes every interval again.

Spacing rounds by the last round's length alone does not bound the share: the next round
publishes the users of the events read meanwhile, and when an update costs more than the events
behind it, rounds grow without the consumer gaining on its backlog. And a round must be bounded
while caught up too: a live stream faster than its updates returns short polls between rounds,
and a round that published every pending user took 28 s of a live 1M-user run at 20k events/s,
learning stopped meanwhile. Bounding caught-up rounds by the share instead (tried) spaced rounds
out wherever updates took more than half of a second that had room for them, and freshness
suffered (at 5k events/s on 1M users p50 6.1 s against 2.3-5.0 s).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np


class UpdateSchedule:
    """When the next publishing round is due, and how long a round may take while behind.

    >>> clock = [0.0]
    >>> s = UpdateSchedule(interval_s=1.0, max_publish_share=0.5, now=lambda: clock[0])
    >>> s.round_done(started=10.0, seconds=0.2, behind=False)
    >>> s.next_round
    11.0
    >>> clock[0] = 13.2  # 3 s of consuming since that round ended at 10.2
    >>> s.budget_s()  # as long again for publishing
    3.0
    >>> s.round_done(started=13.2, seconds=3.0, behind=True)
    >>> s.next_round  # 3 s of publishing: 3 s of consuming next
    19.2
    """

    def __init__(self, interval_s: float, max_publish_share: float,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.max_publish_share = max_publish_share
        self._now = now
        self.next_round = now() + interval_s
        self.last_round_end = now()
        self.last_round_s = 0.0

    def due(self) -> bool:
        return self._now() >= self.next_round

    def budget_s(self) -> float:
        """Publishing time a round may take while behind: ``share / (1 - share)`` of the consuming
        since the last round (all of it, at a share of 1)."""
        share = self.max_publish_share
        if share >= 1.0:
            return float("inf")
        return (self._now() - self.last_round_end) * share / (1.0 - share)

    def round_done(self, started: float, seconds: float, behind: bool) -> None:
        self.last_round_s = seconds
        self.last_round_end = started + seconds
        gap = self.interval_s
        if behind:
            gap = max(gap, seconds / self.max_publish_share)
        self.next_round = started + gap


class PendingUpdates:
    """Users awaiting an update, each with the time of their latest event (coalesced), longest
    waiting first.

    >>> pending = PendingUpdates()
    >>> pending.add(np.array([7, 3, 7]), np.array([100, 200, 300]))
    >>> pending.add(np.array([5]), np.array([400]))
    >>> rows, latest = pending.take(limit=2)  # 7 has waited longest; its latest event is at 300
    >>> rows.tolist(), latest
    ([7, 3], [300, 200])
    >>> len(pending), pending.take()[0].tolist()
    (1, [5])
    """

    def __init__(self) -> None:
        # Insertion order is the order users became pending: a later event updates the time in place.
        self._latest: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._latest)

    def add(self, user_rows: np.ndarray, event_ts: np.ndarray) -> None:
        # A dict built from pairs keeps the last write per key: the latest event in input order.
        self._latest.update(zip(user_rows.tolist(), event_ts.tolist()))

    def forget(self, user_rows: np.ndarray) -> None:
        """Drop forgotten users (their rows are free: there is no one to publish for)."""
        for row in user_rows.tolist():
            self._latest.pop(row, None)

    def event_times(self) -> np.ndarray:
        """The latest event time (epoch ms) of each pending user."""
        return np.fromiter(self._latest.values(), dtype=np.int64, count=len(self._latest))

    def take(self, limit: int | None = None) -> tuple[np.ndarray, list[int]]:
        """The ``limit`` longest-waiting users (all if None; rows) and their latest event times,
        which are no longer pending."""
        if limit is None or limit >= len(self._latest):
            taken, self._latest = self._latest, {}
        else:
            keys = list(itertools.islice(self._latest, limit))
            taken = {key: self._latest.pop(key) for key in keys}
        rows = np.fromiter(taken.keys(), dtype=np.int64, count=len(taken))
        return rows, list(taken.values())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The pending users (rows, in waiting order) and their latest event times, for a checkpoint."""
        return {"users": np.fromiter(self._latest.keys(), dtype=np.int64, count=len(self._latest)),
                "event_ts": self.event_times()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`to_arrays` output (checkpoints from before it have none: nothing pending)."""
        if "users" in arrays:
            self._latest = dict(zip(arrays["users"].tolist(), arrays["event_ts"].tolist()))
