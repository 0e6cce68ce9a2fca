"""The pure logic of bench/scale.py: matching freshness probes to output records, and window rates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("scale_bench", Path(__file__).parents[1] / "bench" / "scale.py")
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


def test_probe_latency_is_the_first_output_covering_the_probe():
    # User 7's outputs, received out of last_event_ts order: the 2nd record (ts 300) covers probe 250,
    # though a later-received record with a smaller ts exists; user 8 only gets outputs before its probe.
    out_users = np.array([7, 7, 7, 8, 9])
    out_last_ts = np.array([100, 300, 200, 50, 1000])
    out_recv = np.array([110.0, 320.0, 330.0, 60.0, 1005.0])
    probes_users = np.array([7, 7, 7, 8, 5])
    probes_ts = np.array([100, 150, 250, 60, 10])
    got = scale.probe_latencies(probes_users, probes_ts, out_users, out_last_ts, out_recv)
    assert got[:3].tolist() == [10.0, 170.0, 70.0]
    assert np.isnan(got[3]) and np.isnan(got[4])  # nothing covers them: unmatched, not dropped


def test_probe_latency_uses_receive_order_not_input_order():
    # The records arrive in input order reversed: the earliest receive time must win.
    got = scale.probe_latencies(np.array([1]), np.array([100]), np.array([1, 1]), np.array([500, 100]),
                                np.array([900.0, 400.0]))
    assert got.tolist() == [300.0]


def test_window_rates_split_events_inside_and_outside_the_window():
    # 100 events/s until t=10, then 20 events/s until t=20; the window is [10, 20].
    timeline = [(float(t), 100 * t if t <= 10 else 1000 + 20 * (t - 10), 0) for t in range(0, 21)]
    timeline[0] = (0.0, 0, 0)
    rates = scale.window_rates(timeline[1:], 10.0, 20.0)
    assert rates["inside_events_per_s"] == pytest.approx(20.0)
    assert rates["outside_events_per_s"] == pytest.approx(100.0)
    assert rates["inside_s"] == pytest.approx(10.0) and rates["outside_s"] == pytest.approx(9.0)


def test_recall_at_k():
    assert scale.recall_at_k([np.array([1, 2]), np.array([3])], [np.array([1, 4]), np.array([3])]) == 0.75
