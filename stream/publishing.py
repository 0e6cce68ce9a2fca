"""Recommendation updates: which users are due one, when the next round is, and the messages.

Updates are coalesced: a user touched several times between two rounds gets one update, made
from their state at the round. Rounds are ``output.flush_interval_s`` apart while the consumer
keeps up. While it is behind (its last poll came back full: a backlog, a catch-up, a replayed
topic), a round that took ``t`` seconds is followed by the next one no sooner than
``t / max_publish_share`` seconds after it started, so publishing never takes more than that
share of the time and the consumer catches up; each user still gets an update with their final
state once the backlog is read. A consumer that has caught up publishes every interval again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


class UpdateSchedule:
    """When the next publishing round is due.

    >>> s = UpdateSchedule(interval_s=1.0, max_publish_share=0.5, now=lambda: 0.0)
    >>> s.round_done(started=10.0, seconds=0.2, behind=False)
    >>> s.next_round
    11.0
    >>> s.round_done(started=20.0, seconds=3.0, behind=True)  # 3 s of publishing: 3 s of consuming next
    >>> s.next_round
    26.0
    """

    def __init__(self, interval_s: float, max_publish_share: float,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.max_publish_share = max_publish_share
        self._now = now
        self.next_round = now() + interval_s
        self.last_round_s = 0.0

    def due(self) -> bool:
        return self._now() >= self.next_round

    def round_done(self, started: float, seconds: float, behind: bool) -> None:
        self.last_round_s = seconds
        gap = self.interval_s
        if behind:
            gap = max(gap, seconds / self.max_publish_share)
        self.next_round = started + gap


class PendingUpdates:
    """Users awaiting an update, each with the time of their latest event (coalesced)."""

    def __init__(self) -> None:
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

    def take(self) -> tuple[np.ndarray, list[int]]:
        """All pending users (rows) and their latest event times; the set is empty afterwards."""
        latest, self._latest = self._latest, {}
        rows = np.fromiter(latest.keys(), dtype=np.int64, count=len(latest))
        return rows, list(latest.values())
