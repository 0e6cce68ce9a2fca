"""Event time from Kafka records: the time an event without one takes, and what "now" is.

Live consumption and ``replay --from-topic`` both go through :func:`settle_timestamps`,
so the same topic gives the same state either way.
"""

from __future__ import annotations

import time

import numpy as np


def settle_timestamps(stamps: np.ndarray, message_ts: np.ndarray, tolerance_ms: int) -> int:
    """Fix event times in place against their records' timestamps; returns how many were ahead.

    An event without a time (``-1``) takes its record's. An event more than ``tolerance_ms``
    after its record's time is a clock accident (a device set to 2090, a ms/us mix-up): it
    takes the record's time too, so it is still learned but moves no one's short-term vector
    into the future. Records without a timestamp (``-1``) check nothing.

    >>> stamps = np.array([-1, 5_000, 10**15, 9_000])
    >>> settle_timestamps(stamps, np.array([1_000, 4_000, 4_000, -1]), 2_000), stamps.tolist()
    (1, [1000, 5000, 4000, 9000])
    """
    missing = stamps < 0
    stamps[missing] = message_ts[missing]
    ahead = (message_ts >= 0) & (stamps > message_ts + tolerance_ms)
    stamps[ahead] = message_ts[ahead]
    return int(np.count_nonzero(ahead))


def batch_now(stamps: np.ndarray, tolerance_ms: int, wall_ms: int | None = None) -> int:
    """The latest event time of a batch that may count as "now" (the time short-term interest is
    faded to for everyone): never more than ``tolerance_ms`` past the wall clock, so no single
    record, however wrong its clock, fades every user's short-term vector to nothing.

    >>> batch_now(np.array([5, 10**15]), 1_000, wall_ms=2_000)
    3000
    """
    wall_ms = int(time.time() * 1000) if wall_ms is None else wall_ms
    return min(int(stamps.max()), wall_ms + tolerance_ms)
