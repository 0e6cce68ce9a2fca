"""Telling when the model no longer fits the stream: loss drift and item-vector drift."""

from __future__ import annotations

import numpy as np
from river.drift import ADWIN


class LossDriftDetector:
    """ADWIN over the prequential loss; reports only changes for the worse.

    Fed the mean loss of every ``group`` events (before learning from them):
    enough observations for ADWIN to see a change within a few thousand events,
    few enough to cost nothing per event. ADWIN flags any change in the mean,
    including the fall (and the small wobbles) of the loss while a model warms
    up; a signal is raised only when, at a change ADWIN found, the latest
    observations sit at least ``min_rise`` (relative) above the mean before it.

    >>> detector = LossDriftDetector(group=1)
    >>> detector.update(np.full(2000, 0.3))
    False
    >>> detector.update(np.full(500, 0.9))
    True
    >>> round(detector.last_change[1], 1)
    0.9
    """

    def __init__(self, delta: float = 0.002, group: int = 100, min_rise: float = 0.1, recent: int = 10) -> None:
        self.adwin = ADWIN(delta=delta, clock=1)
        self.group = group
        self.min_rise = min_rise
        self._recent: list[float] = []
        self._pending = np.zeros(0, dtype=np.float64)  # losses of a group not yet full
        self._recent_size = recent
        self.detections = 0
        self.last_change: tuple[float, float] | None = None  # (mean before, mean after)

    @property
    def mean(self) -> float:
        return float(self.adwin.estimation)

    def update(self, losses: np.ndarray) -> bool:
        """Add a batch of per-event losses; True when the loss rose significantly.

        Losses are grouped across batches (a batch's last partial group waits for
        the next batch), so what ADWIN sees does not depend on how the stream was cut.
        """
        rose = False
        losses = np.concatenate([self._pending, np.asarray(losses, dtype=np.float64)])
        n = len(losses) // self.group * self.group
        self._pending = losses[n:]
        for value in losses[:n].reshape(-1, self.group).mean(axis=1).tolist():
            before = self.adwin.estimation
            self.adwin.update(value)
            self._recent = [*self._recent[1 - self._recent_size:], value]
            latest = float(np.mean(self._recent))
            if self.adwin.drift_detected and latest > (1.0 + self.min_rise) * before:
                self.detections += 1
                self.last_change = (float(before), latest)
                rose = True
        return rose


class ItemDriftAlarm:
    """Says when item vectors moved between two index builds much more than between the two before.

    A young model's items keep turning for a while (on the benchmark stream,
    0.66-0.78 between its first builds) and settle build by build; an absolute
    threshold alone raised "retrain" alarms there. A signal needs the drift to
    pass ``threshold`` and to be ``rise`` times the previous build's; the first
    measurement only sets that baseline. A drift measured on fewer than
    ``min_items`` items is noise: it neither signals nor becomes the baseline.

    >>> alarm = ItemDriftAlarm(threshold=0.3)
    >>> [alarm.update(d, items=100) for d in (0.78, 0.73, 0.66, 0.05, 0.04, 0.9)]
    [False, False, False, False, False, True]
    >>> alarm = ItemDriftAlarm(threshold=0.3)
    >>> [alarm.update(0.0, items=0), alarm.update(0.7, items=100)]
    [False, False]
    """

    def __init__(self, threshold: float = 0.3, rise: float = 2.0, min_items: int = 20) -> None:
        self.threshold = threshold
        self.rise = rise
        self.min_items = min_items
        self.previous: float | None = None

    def update(self, drift: float, items: int) -> bool:
        """``drift`` between the last two builds, measured on ``items`` items; True to signal."""
        if items < self.min_items:
            return False
        alarm = self.previous is not None and drift > self.threshold and drift > self.rise * self.previous
        self.previous = drift
        return alarm


def mean_cosine_drift(previous: np.ndarray, current: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Mean cosine distance between the rows two snapshots share (new rows are ignored).

    ``rows`` (indices) limits it to those rows, e.g. the items that
    had enough events to have left their random start: a young item's vector moves
    a lot and says nothing about drift.

    >>> a = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> mean_cosine_drift(a, np.array([[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]))
    0.5
    >>> mean_cosine_drift(a, np.array([[1.0, 0.0], [1.0, 0.0]]), rows=np.array([0]))
    0.0
    """
    n = min(len(previous), len(current))
    if n == 0:
        return 0.0
    a, b = previous[:n].astype(np.float64), current[:n].astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = norms > 0
    if rows is not None:
        chosen = np.zeros(n, dtype=bool)
        chosen[rows[rows < n]] = True
        ok &= chosen
    cosine = np.einsum("ij,ij->i", a[ok], b[ok]) / norms[ok]
    return float(np.mean(1.0 - cosine)) if ok.any() else 0.0
