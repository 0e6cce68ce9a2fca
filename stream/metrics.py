"""Prometheus metrics of a running service, read at scrape time.

Most numbers already live in the service (its stats, the model's sizes, the
refresher's current index, the checkpoint store): a collector reads them when
Prometheus scrapes, so they cost the consumer nothing. What must be observed
as it happens (batch apply time, events by partition and kind, dead letters by
reason, flush time, freshness, consumer lag) arrives through three calls the
service makes once per batch, per dead letter and per flush, each a few numpy
operations on arrays the service already has: never a call per event.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from confluent_kafka import TopicPartition
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from recstream.stream.service import RecStreamService

# Bucket bounds in seconds. Batches apply in milliseconds; a flush publishes and waits for delivery
# (up to output.delivery_timeout_s); freshness spans the flush interval up to hours for a backlog.
APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Dead-letter reasons carry details (the bad value, a byte count); labels keep their fixed start,
# and past this many distinct reasons the rest count as "other", so a flood of odd input cannot
# grow the label set without bound.
MAX_REASONS = 50
_REASON_CUT = re.compile(r"[:'\"(\[]")
_DIGITS = re.compile(r"\d+")


def reason_label(reason: str) -> str:
    """The fixed part of a dead-letter reason, as a bounded label value.

    >>> reason_label("unknown event_type 'rating' (configure it in events.weights)")
    'unknown event_type'
    >>> reason_label("message of 70000 bytes exceeds max_message_bytes=65536")
    'message of N bytes exceeds max_message_bytes=N'
    """
    head = _REASON_CUT.split(reason, 1)[0]
    return _DIGITS.sub("N", head).strip()[:80] or "other"


class Histogram:
    """A histogram that takes many observations in one numpy call (one per flush, not per user).

    prometheus-client's Histogram observes one value per call under a lock, which
    at one call per published update would cost the consumer more than the update.
    """

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # last: above every bound
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, values: np.ndarray | float) -> None:
        values = np.atleast_1d(np.asarray(values, dtype=np.float64))
        if not len(values):
            return
        # Prometheus buckets are "less than or equal": the first bound >= the value.
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.counts))
        with self._lock:
            self.counts += counts
            self.sum += float(values.sum())

    def snapshot(self) -> np.ndarray:
        """Observations per bucket so far (the last: above every bound)."""
        with self._lock:
            return self.counts.copy()

    def quantile(self, counts: np.ndarray, q: float) -> float:
        """The ``q`` quantile of observations binned as ``counts`` (e.g. a difference of two snapshots),
        interpolated linearly within its bucket as Prometheus's histogram_quantile does; NaN if none.

        >>> h = Histogram("x", "doc", (1.0, 2.0, 4.0))
        >>> h.observe(np.array([0.5, 1.5, 1.5, 3.0]))
        >>> h.quantile(h.snapshot(), 0.5)
        1.5
        """
        total = int(counts.sum())
        if total == 0:
            return float("nan")
        rank = q * total
        cumulative = np.cumsum(counts)
        b = int(np.searchsorted(cumulative, rank, side="left"))
        if b >= len(self.bounds):  # above the last bound: all we know is that it is past it
            return float(self.bounds[-1])
        lower = 0.0 if b == 0 else float(self.bounds[b - 1])
        below = 0 if b == 0 else int(cumulative[b - 1])
        return lower + (float(self.bounds[b]) - lower) * (rank - below) / max(int(counts[b]), 1)

    def family(self) -> HistogramMetricFamily:
        with self._lock:
            cumulative = np.cumsum(self.counts).tolist()
            total = self.sum
        buckets = [(floatToGoString(b), c) for b, c in zip(self.bounds.tolist(), cumulative)]
        buckets.append(("+Inf", cumulative[-1]))
        return HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class ServiceMetrics:
    """The service's metrics: observations from the consumer thread, everything else read at scrape.

    Attach with ``service.metrics = ServiceMetrics(service)`` before ``run()``;
    ``exposition()`` is the /metrics body.
    """

    def __init__(self, service: RecStreamService) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.apply_seconds = Histogram("recstream_batch_apply_seconds",
                                       "Time to apply one batch of valid events to the model (model lock held)",
                                       APPLY_BUCKETS)
        self.flush_seconds = Histogram("recstream_output_flush_seconds",
                                       "Time to compute, produce and deliver one flush's recommendation updates",
                                       FLUSH_BUCKETS)
        self.freshness = Histogram("recstream_freshness_seconds",
                                   "Event time of each user's latest event to the delivery of their update",
                                   FRESHNESS_BUCKETS)
        self._applied: dict[tuple[str, str], int] = {}  # (partition, kind) -> events applied in this process
        self._dead: dict[str, int] = {}  # reason label -> dead letters in this process
        self.lag: dict[tuple[str, int], int] = {}  # as of the last flush
        self._lock = threading.Lock()

    # -- observations (consumer thread) ----------------------------------------------------------

    def batch_applied(self, seconds: float, partitions: np.ndarray, explicit: np.ndarray) -> None:
        """One applied batch: its apply time, and each event's partition and kind (rating or not)."""
        self.apply_seconds.observe(seconds)
        counts = {}
        for kind, mask in (("explicit", explicit), ("implicit", ~explicit)):
            per_partition = np.bincount(partitions[mask])
            for p in np.flatnonzero(per_partition).tolist():
                counts[(str(p), kind)] = int(per_partition[p])
        with self._lock:
            for key, n in counts.items():
                self._applied[key] = self._applied.get(key, 0) + n

    def dead_letter(self, reason: str) -> None:
        label = reason_label(reason)
        with self._lock:
            if label not in self._dead and len(self._dead) >= MAX_REASONS:
                label = "other"
            self._dead[label] = self._dead.get(label, 0) + 1

    def flushed(self, event_ms: np.ndarray, seconds: float) -> None:
        """A flush delivered its updates: flush time, freshness per update, and consumer lag now."""
        self.flush_seconds.observe(seconds)
        if len(event_ms):
            now_ms = time.time() * 1000.0
            self.freshness.observe(np.maximum(now_ms - event_ms, 0.0) / 1000.0)
        self._update_lag()

    def _update_lag(self) -> None:
        # On the consumer thread: the client is not closed under us. cached=True reads the high
        # watermark of the last fetch response, with no broker round trip.
        service = self.service
        consumer = service.consumer
        if consumer is None:
            return
        lag = {}
        for topic, partition in service.stats.assigned:
            position = service.state.positions.get(f"{topic}/{partition}")
            try:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except Exception:  # no fetch yet for this partition, or the client is going away
                continue
            if position is not None and position >= 0 and high >= 0:
                lag[(topic, partition)] = max(high - position, 0)
        self.lag = lag

    # -- scrape (HTTP thread) --------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        service = self.service
        s = service.stats
        now = time.monotonic()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        with self._lock:
            applied, dead = dict(self._applied), dict(self._dead)
        family = CounterMetricFamily("recstream_events_applied", "Valid events applied by this process",
                                     labels=["partition", "kind"])
        for (partition, kind), n in sorted(applied.items()):
            family.add_metric([partition, kind], n)
        yield family
        family = CounterMetricFamily("recstream_dead_letters", "Messages sent to the dead-letter topic, by reason",
                                     labels=["reason"])
        for reason, n in sorted(dead.items()):
            family.add_metric([reason], n)
        yield family
        yield counter("recstream_messages", "Input messages consumed (valid, dead-lettered and metadata)", s.messages)
        yield counter("recstream_output_updates", "Recommendation updates published", s.updates_published)
        yield counter("recstream_delivery_failures", "Output or dead-letter deliveries that failed (then retried)",
                      s.delivery_failures)
        yield counter("recstream_commits", "Offset commits to the consumer group", s.commits)
        yield self.apply_seconds.family()
        yield self.flush_seconds.family()
        yield self.freshness.family()
        family = GaugeMetricFamily("recstream_consumer_lag", "Messages behind the partition's high watermark "
                                   "(as of the last flush)", labels=["topic", "partition"])
        for (topic, partition), lag in sorted(self.lag.items()):
            family.add_metric([topic, str(partition)], lag)
        yield family
        yield gauge("recstream_assigned_partitions", "Partitions assigned to this member", len(s.assigned))
        yield gauge("recstream_pending_updates", "Users whose update waits for a publishing round",
                    len(service.state.pending))
        yield gauge("recstream_loop_turn_age_seconds", "Seconds since the poll loop last turned",
                    now - service.last_loop_turn)
        yield gauge("recstream_last_event_timestamp_seconds", "Event time of the newest event applied",
                    s.last_event_ts / 1000.0)

        model = service.model
        yield gauge("recstream_model_users", "Users in the model", model.users.ids.live)
        yield counter("recstream_users_forgotten", "Users forgotten since start-up (model.max_users, user_ttl_s)",
                      service.state.users_forgotten)
        yield counter("recstream_items_forgotten", "Items forgotten since start-up (model.max_items, item_ttl_s)",
                      service.state.items_forgotten)
        yield gauge("recstream_model_items", "Items in the model", model.items.ids.live)
        yield gauge("recstream_model_version", "Model version (one per applied batch)", model.model_version)
        yield counter("recstream_model_events", "Events the model has learned, restored checkpoints included",
                      model.events_applied)

        refresher = service.refresher
        index = refresher.current
        yield gauge("recstream_index_version", "Version of the index serving queries (0: none yet)",
                    index.version if index else 0)
        yield gauge("recstream_index_age_seconds", "Seconds since the serving index was built (NaN: none yet)",
                    now - index.built_at if index else float("nan"))
        yield gauge("recstream_index_build_seconds", "Time the serving index took to build",
                    index.build_seconds if index else float("nan"))
        yield gauge("recstream_index_items", "Items in the serving index", index.n_items if index else 0)
        yield counter("recstream_index_builds", "Index builds completed", refresher.builds)
        yield counter("recstream_index_build_failures", "Index builds that failed (the old index stayed)",
                      refresher.failures)

        yield counter("recstream_sync_items_sent", "Item deltas this member sent to its group", s.sync_items_sent)
        yield counter("recstream_sync_items_received", "Other members' item deltas applied", s.sync_items_received)
        yield counter("recstream_sync_snapshots_written", "Item snapshots written for members that start late",
                      s.sync_snapshots_written)
        yield gauge("recstream_sync_snapshot_items", "Items restored from the group's item snapshot at start",
                    s.sync_snapshot_items)
        yield counter("recstream_sync_clicks_sent", "Session clicks this member sent to its group", s.sync_clicks_sent)
        yield counter("recstream_sync_clicks_received", "Other members' session clicks learned",
                      s.sync_clicks_received)
        yield counter("recstream_users_handed_over", "Users handed to the next owner of a revoked partition",
                      s.users_handed_over)
        yield counter("recstream_users_taken_over", "Users taken over with a newly assigned partition",
                      s.users_taken_over)

        yield counter("recstream_checkpoints", "Checkpoints written and committed", s.checkpoints)
        yield gauge("recstream_checkpoint_snapshot_seconds", "Consumer stall for the last checkpoint's snapshot",
                    s.last_checkpoint_s)
        yield gauge("recstream_checkpoint_age_seconds", "Seconds since the newest checkpoint was written "
                    "(NaN: none, or no state dir)", self.checkpoint_age())

        yield gauge("recstream_loss_mean", "ADWIN's estimate of the prequential loss per event", s.loss_mean)
        yield counter("recstream_loss_drifts", "Material rises of the prequential loss (retrain recommended)",
                      s.loss_drifts)
        yield gauge("recstream_item_drift", "Mean cosine distance of settled item vectors between the last two "
                    "index builds", s.item_drift)

    def checkpoint_age(self) -> float:
        store = self.service.store
        if store is None:
            return float("nan")
        # The metadata file is renamed into place last: its mtime is when the checkpoint became valid.
        newest = max((p.stat().st_mtime for p in store.directory.glob("ckpt-*.json")), default=None)
        return float("nan") if newest is None else max(time.time() - newest, 0.0)
