"""The processing loop: consume a batch, learn from it, publish fresh top-K, checkpoint, commit.

Per batch: ``consume``, decode (bad messages go to the dead-letter topic),
apply the valid events to the model in one kernel call. Every
``flush_interval_s``: recommend for each user touched since the last flush
(once per user), produce the updates and wait until every update and dead
letter is delivered. Then:

- with a state dir (effectively-once state): every ``checkpoint.interval_s``
  or ``checkpoint.events``, on revoke and on shutdown, write a checkpoint of
  the whole state with the offsets it corresponds to, then commit those
  offsets. On start and on assign each partition resumes at the checkpoint's
  offset (or the group's, if another member got further), so after a crash
  the events since the checkpoint are applied once more to the state they
  were missing from, never twice;
- without one (at-least-once): commit after every flush; a crash replays the
  uncommitted events onto a model that already learned from them.

Output updates may repeat after a crash; they are keyed by user and the
latest wins, so they are idempotent for consumers of the output topic.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from recstream.embeddings.drift import ItemDriftAlarm, LossDriftDetector
from recstream.index.query import Recommender
from recstream.index.refresh import IndexRefresher
from recstream.stream.broker import topic_ids, wait_for_cluster
from recstream.stream.checkpoint import BackgroundCheckpointWriter, CheckpointStore, StateDirLock
from recstream.stream.clock import batch_now, settle_timestamps
from recstream.stream.config import ConfigError, ServiceConfig
from recstream.stream.events import EventBatch, EventDecoder
from recstream.stream.logs import kafka_logger, settings_for
from recstream.stream.membership import GroupMembership
from recstream.stream.metadata import parse_item_metadata
from recstream.stream.offsets import OffsetBook, resume_offset
from recstream.stream.output import OutputProducer
from recstream.stream.publishing import UpdateSchedule
from recstream.stream.state import RecState
from recstream.stream.update_json import update_values

log = logging.getLogger(__name__)

DLQ_REASON_HEADER = "recstream.error"
# librdkafka's logical offsets, by what they mean for an assigned partition (the log says these).
_OFFSET_NAMES = {OFFSET_INVALID: "committed", OFFSET_BEGINNING: "earliest", OFFSET_END: "latest"}
# Users per recommendation call in a round: small enough that a round with a time budget stops
# near it and that a round of a whole catch-up's users does not hold all their candidates and
# messages at once, large enough to spread the per-call work (hot set, its clusters).
_ROUND_CHUNK = 4096


@dataclass
class ServiceStats:
    """Counters a person (or a test) reads to see what the service has done."""

    messages: int = 0
    events_applied: int = 0
    dead_letters: int = 0
    updates_published: int = 0
    commits: int = 0
    checkpoints: int = 0
    last_checkpoint_s: float = 0.0
    delivery_failures: int = 0
    last_event_ts: int = 0  # "now" for fading short-term interest (see stream/clock.py)
    clock_ahead: int = 0  # events whose time was past their record's (+ tolerance): given the record's
    loss_mean: float = 0.0  # ADWIN's estimate of the prequential loss per event
    loss_drifts: int = 0  # times the loss rose significantly: retrain recommended
    item_drift: float = 0.0  # mean cosine distance of item vectors between the last two index builds
    item_metadata: int = 0  # item metadata messages applied
    cold_items_refreshed: int = 0  # cold items given content vectors (all refreshes)
    sync_items_sent: int = 0  # item deltas sent to the group (stream/group_sync.py)
    sync_items_received: int = 0  # other members' item deltas applied
    sync_clicks_sent: int = 0  # session clicks sent to the group (sync.sessions)
    sync_clicks_received: int = 0  # other members' session clicks learned
    sync_snapshots_written: int = 0  # item snapshots written for members that start late
    sync_snapshot_items: int = 0  # items restored from the group's snapshot at start (0: none)
    users_handed_over: int = 0  # to the next owner of a revoked partition (stream/handover.py)
    users_taken_over: int = 0  # with a newly assigned partition
    assigned: list[tuple[str, int]] = field(default_factory=list)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _compile_kernels(config: ServiceConfig) -> None:
    """Run every compiled kernel of the loop once on a throwaway model (numba compiles on first
    call, or loads its on-disk cache), so that no batch waits for a compiler."""
    state = RecState(config.model)
    n = 64
    rng = np.random.default_rng(0)
    batch = EventBatch([f"u{u}" for u in rng.integers(0, 8, n)], [f"i{i}" for i in range(n)],
                       np.where(np.arange(n) % 2, np.float32(4.0), np.float32(np.nan)).astype(np.float32),
                       np.ones(n, dtype=np.float32), np.arange(n, dtype=np.int64), list(range(n)))
    users, _, _ = state.apply(batch)
    recommender = Recommender(state.model, state.history, config.output.top_k, exact_items=n // 2)
    top = recommender.recommend(np.unique(users), None, n)
    update_values(state.model.users.ids, state.model.items.ids, top.user_rows, top.item_rows,
                  np.nan_to_num(top.scores, neginf=0.0), [0] * len(top), 0, 0, 0)


class RecStreamService:
    """Owns the consumer, the producer, the state and the index refresher.

    ``run()`` blocks until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT),
    then finishes the batch in hand, publishes, checkpoints, commits and closes.
    """

    def __init__(
        self,
        config: ServiceConfig,
        stop: threading.Event | None = None,
        on_flush: Callable[[RecStreamService], None] | None = None,
    ) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        self.on_flush = on_flush
        self.stats = ServiceStats()
        out = config.output
        self._lock: StateDirLock | None = None
        if config.state_dir:
            state_dir = Path(config.state_dir)
            self._lock = StateDirLock(state_dir)  # first: a second process on the dir stops here
            self.store: CheckpointStore | None = CheckpointStore(state_dir / "checkpoints", config.checkpoint.keep)
            self.writer = BackgroundCheckpointWriter(self.store)
            index_dir = state_dir / "index"
        else:
            self.store = None
            self._tmp = tempfile.TemporaryDirectory(prefix="recstream-index-")
            index_dir = Path(self._tmp.name)
        self.state = RecState.load_or_new(self.store, config.model, out.history_per_user)
        self.state.use_text_encoder(config.content.text_encoder)
        self.model = self.state.model
        self.model_lock = threading.Lock()
        self.recommender = Recommender(self.model, self.state.history if out.exclude_seen else None,
                                       out.top_k, config.index.search_k, exact_items=config.index.exact_items,
                                       max_lookups=config.index.max_lookups, sessions=self.state.sessions,
                                       min_item_events=config.index.min_item_events)
        self.decoder = EventDecoder(config.events)
        self.loss_drift = LossDriftDetector(config.monitor.adwin_delta)
        self.item_drift_alarm = ItemDriftAlarm(config.monitor.item_drift_threshold)
        self._reported_index_version = 0
        self.refresher = IndexRefresher(self.model, self.model_lock, index_dir, config.index,
                                        first_version=self.state.index_version + 1)
        self._behind = False  # the last poll came back full: there is a backlog
        self.offsets = OffsetBook()  # what is applied, checkpointed, committed (stream/offsets.py)
        self._retrying_delivery = False
        self._schedule = UpdateSchedule(out.flush_interval_s, out.max_publish_share)
        self._next_checkpoint = time.monotonic() + config.checkpoint.interval_s
        self._next_content_refresh = 0.0
        self._state_changed = False  # anything applied or skipped since the last checkpoint
        self._checkpointed_events = self.model.events_applied
        self.consumer: Consumer | None = None
        self.output: OutputProducer | None = None  # every record delivered or produced again
        self.membership: GroupMembership | None = None  # what is shared with the group ([sync]), if anything
        self._admin: AdminClient | None = None  # for topic ids (see _forget_recreated_topics)
        # Read by the HTTP side (stream/web.py): when the poll loop last turned (/healthz), and an
        # optional stream.metrics.ServiceMetrics that gets one call per batch, dead letter and flush.
        self.last_loop_turn = time.monotonic()
        self.metrics = None

    # -- Kafka clients -------------------------------------------------------------------------

    def _client_configs(self) -> tuple[dict, dict]:
        cfg = self.config
        consumer = {
            "group.id": cfg.topics.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # Big fetches overflow the default queue and pause fetching for a second.
            "queued.min.messages": 1_000_000,
            "fetch.queue.backoff.ms": 10,
            "logger": kafka_logger(),  # librdkafka's lines through logging, repeats folded
            **settings_for("consumer", cfg.kafka),  # [kafka] / -X: only what a consumer takes
            **cfg.kafka_consumer,
        }
        producer = {
            "enable.idempotence": True,
            "linger.ms": 20,
            "compression.type": "lz4",
            # An output topic that vanished is an error to retry, not a topic to create.
            "allow.auto.create.topics": False,
            # Dead letters carry the original bytes, which may be as large as the input topic allows.
            "message.max.bytes": 16 * 1024 * 1024,
            "logger": kafka_logger(),
            **settings_for("producer", cfg.kafka),
            **cfg.kafka_producer,
        }
        return consumer, producer

    def _check_topics(self):
        """The cluster's metadata, once every topic the config names is among its topics."""
        topics = self.config.topics
        metadata = wait_for_cluster(self.output.producer, self.config.bootstrap_servers, self.config.loop.startup_timeout_s,
                                    self.stop)
        for field_name, topic in (("topics.input", topics.input), ("topics.output", topics.output),
                                  ("topics.dead_letter", topics.dlq), ("topics.item_metadata", topics.item_metadata)):
            if topic and topic not in metadata.topics:
                raise ConfigError(f"{field_name}: topic {topic!r} does not exist on "
                                  f"{self.config.bootstrap_servers} (create it, e.g. `recstream topics`)")
        return metadata

    def _take_over(self, partitions: list[TopicPartition]) -> None:
        if self.membership is None:
            return
        def committed(tps: list[TopicPartition]) -> dict[int, int]:
            return {tp.partition: tp.offset for tp in self.consumer.committed(tps, timeout=30)}

        our_commits = self.store.last_commits() if self.store is not None else {}
        if self.membership.take_over(partitions, committed, our_commits):
            self._state_changed = True

    def _sync_items(self) -> None:
        moved, changed = self.membership.turn()
        if moved:
            self.refresher.poke()
        if changed:
            self._state_changed = True

    # -- main loop -----------------------------------------------------------------------------

    def run(self) -> None:
        # Every decoded event is a short-lived dict, and the long-lived state (histories, id maps)
        # is millions of small containers: with the default thresholds the cyclic GC rescans them
        # constantly. Measured with bench/throughput.py: steady end to end 159k -> 241k events/s.
        gc.set_threshold(50_000, 20, 100)
        _compile_kernels(self.config)  # before joining the group: a first compile can outlast max.poll.interval.ms
        consumer_cfg, producer_cfg = self._client_configs()
        self.output = OutputProducer(producer_cfg, self.config.topics.dlq, self.stats)
        metadata = self._check_topics()
        self.membership = GroupMembership.join(self.config, self.state, self.model_lock, self.stats, metadata,
                                               consumer_cfg, self._produce, self._dead_letter)
        # An admin client is a producer-type instance: consumer-only settings would draw warnings.
        self._admin = AdminClient({**settings_for("producer", {**self.config.kafka, **self.config.kafka_consumer}),
                                   "logger": kafka_logger()})
        self.consumer = Consumer(consumer_cfg)
        topics = [self.config.topics.input] + [t for t in [self.config.topics.item_metadata] if t]
        self.consumer.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        if self.config.output.publish:  # learn-only runs (backfills) query no index: do not build one
            self.refresher.start()
        loop = self.config.loop
        log.info("consuming %s as group %s", self.config.topics.input, self.config.topics.group_id)
        try:
            while not self.stop.is_set():
                self.last_loop_turn = time.monotonic()
                messages = self.consumer.consume(loop.batch_size, self._poll_timeout())
                self._behind = len(messages) >= loop.batch_size
                # Behind, rounds answer from the hot set alone: an index build would take a core
                # from the catch-up for nothing. The next one starts once the consumer caught up.
                self.refresher.held = self._behind
                if messages:
                    self._process(messages)
                if self.membership is not None:
                    self._sync_items()
                if self.store is not None:
                    # Commit as soon as a checkpoint is written, not at the next flush: until then a
                    # crash leaves events in the checkpoint that the partition's next owner reads again.
                    self._collect_checkpoint()
                # Users may wait with nothing left to commit (a round's budget ran out after the
                # checkpoint that committed their events): they are still due their update.
                if (self.offsets or self.state.pending) and (
                    self._schedule.due()
                    or (not self._behind and len(self.state.pending) >= self.config.output.max_pending_users)
                ):
                    self.flush(budgeted=True)
            if self.membership is not None:  # the group gets our last changes; the checkpoint counts them sent
                self.membership.send_last()
            self.flush(checkpoint=True)
        finally:
            if self.membership is not None:
                self.membership.close()
            self.refresher.stop()
            try:
                self.consumer.close()  # revokes: _on_revoke flushes what is left
            finally:
                self.output.flush(self.config.output.delivery_timeout_s)
                if self._lock is not None:
                    self._lock.release()
        log.info("stopped after %d events", self.stats.events_applied)

    def _poll_timeout(self) -> float:
        """How long a poll may wait for a full batch: ``loop.poll_timeout_s``, but no later than the
        next round while users wait for an update (a poll waits its whole timeout unless a full
        batch arrives, so a live stream's round would otherwise start up to that much late)."""
        timeout = self.config.loop.poll_timeout_s
        if self.state.pending:
            timeout = min(timeout, max(0.0, self._schedule.next_round - time.monotonic()))
        return timeout

    def _process(self, messages: list[Message]) -> None:
        good = messages
        if any(m.error() is not None for m in messages):
            good = []
            for m in messages:
                err = m.error()
                if err is None:
                    good.append(m)
                elif err.code() != KafkaError._PARTITION_EOF:
                    if err.fatal():
                        raise KafkaException(err)
                    log.warning("consumer error: %s", err)
        metadata_topic = self.config.topics.item_metadata
        if metadata_topic and good:
            metadata = [m for m in good if m.topic() == metadata_topic]
            if metadata:
                good = [m for m in good if m.topic() != metadata_topic]
                self._apply_metadata(metadata)
        if not good:
            return
        values = [m.value() for m in good]
        batch, bad = self.decoder.decode(values)
        for position, reason in bad:
            self._dead_letter(good[position], reason)
        topic = self.config.topics.input
        parts = [m.partition() for m in good]
        # One input topic: the last message of each partition carries its next offset.
        last_of = {p: n for n, p in enumerate(parts)}
        next_offsets = {p: good[n].offset() + 1 for p, n in last_of.items()}
        if len(batch):
            stamps = batch.timestamps
            record_ts = np.fromiter((good[p].timestamp()[1] for p in batch.positions), np.int64, len(batch))
            self.stats.clock_ahead += settle_timestamps(stamps, record_ts, self.decoder.clock_tolerance_ms)
            partitions = np.array(parts, dtype=np.int64)
            started = time.perf_counter()
            with self.model_lock:
                user_rows, _, losses = self.state.apply(batch, topic, partitions[batch.positions])
            if self.metrics is not None:
                self.metrics.batch_applied(time.perf_counter() - started, partitions[batch.positions],
                                           ~np.isnan(batch.ratings))
            if self.loss_drift.update(losses):
                before, after = self.loss_drift.last_change
                self.stats.loss_drifts += 1
                log.warning("drift: prequential loss rose from %.4f to %.4f per event (ADWIN); "
                            "retrain/reindex recommended", before, after)
            self.stats.loss_mean = self.loss_drift.mean
            if self.config.output.publish:
                self.state.pending.add(user_rows, stamps)
                self.state.pending.forget(self.state.forgotten)  # bounded memory: users the batch forgot
            self.stats.events_applied += len(batch)
            self.stats.last_event_ts = max(self.stats.last_event_ts, batch_now(stamps, self.decoder.clock_tolerance_ms))
            self.refresher.poke()
        self._advance({(topic, p): o for p, o in next_offsets.items()})
        self.stats.messages += len(good)  # last: a reader seeing the count sees the batch applied

    def _advance(self, next_offsets: dict[tuple[str, int], int]) -> None:
        self.state.advance({f"{t}/{p}": o for (t, p), o in next_offsets.items()})
        self.offsets.applied(next_offsets)
        self._state_changed = True

    def _apply_metadata(self, messages: list[Message]) -> None:
        """Item metadata (``{"item_id", "features", "text"}``) from the metadata topic; bad ones to the DLQ."""
        ids, features, texts = [], [], []
        for m in messages:
            try:
                item_id, item_features, text = parse_item_metadata(m.value())
            except ValueError as exc:
                self._dead_letter(m, f"bad item metadata: {exc}")
                continue
            ids.append(item_id)
            features.append(item_features)
            texts.append(text)
        if ids:
            encoded = self.state.encode_item_metadata(features, texts)  # the slow part, without the lock
            with self.model_lock:
                self.state.set_item_metadata(ids, features, texts, encoded)
            self.stats.item_metadata += len(ids)
        self._advance({(m.topic(), m.partition()): m.offset() + 1 for m in messages})
        self.stats.messages += len(messages)

    def _dead_letter(self, message: Message, reason: str) -> None:
        headers = [
            (DLQ_REASON_HEADER, reason.encode()),
            ("recstream.source", f"{message.topic()}/{message.partition()}/{message.offset()}".encode()),
        ]
        self._produce(self.config.topics.dlq, message.key(), message.value(), headers)
        self.stats.dead_letters += 1
        if self.metrics is not None:
            self.metrics.dead_letter(reason)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: list | None = None,
                 partition: int = -1) -> None:
        self.output.produce(topic, key, value, headers, partition)

    # -- publishing, checkpointing and committing ----------------------------------------------

    def flush(self, checkpoint: bool = False, patient: bool = True, budgeted: bool = False) -> bool:
        """Publish updates for the users touched since the last flush, deliver, then commit.

        With a state dir, offsets are committed only together with a checkpoint
        (when one is due, or ``checkpoint`` is set). ``patient=False`` (inside a
        rebalance callback) tries delivery once instead of retrying. ``budgeted``
        (the loop's rounds): publish only for the round's time budget (while behind,
        publishing's share of the time; caught up, one flush interval: stream.publishing);
        the users left stay pending, carried by the checkpoints, and without a state dir
        nothing is committed until none are left. Returns
        False if output was left undelivered, and so nothing was committed.
        """
        started = time.monotonic()
        budget = None
        if budgeted:  # while behind, publishing's share; caught up, one interval
            budget = self._schedule.budget_s() if self._behind else self.config.output.flush_interval_s
        published_ms: list[np.ndarray] = []
        try:
            while self.state.pending:
                while self.state.pending:  # in chunks; delivered once, at the end
                    published_ms.append(self._publish_updates(_ROUND_CHUNK))
                    if budget is not None and time.monotonic() - started >= budget:
                        break  # at least one chunk per round: the backlog of updates always moves
                if not self._deliver_all(patient):
                    return False  # leave the offsets uncommitted
                if budget is not None:
                    break  # the rest waits; unbudgeted, events applied while deliveries were retried join
        finally:
            self._schedule.round_done(started, time.monotonic() - started, self._behind)
            log.debug("round: %d updates in %.3fs (%s), %d waiting", sum(map(len, published_ms)),
                      time.monotonic() - started, "behind" if self._behind else "caught up", len(self.state.pending))
        if not self._deliver_all(patient):
            return False
        if self.metrics is not None:
            self.metrics.flushed(np.concatenate(published_ms) if published_ms else np.zeros(0, np.int64),
                                 time.monotonic() - started)
        if self.store is not None:
            self._collect_checkpoint()
            due = (time.monotonic() >= self._next_checkpoint
                   or self.model.events_applied - self._checkpointed_events >= self.config.checkpoint.events)
            if checkpoint or due:
                self._checkpoint(wait=checkpoint)
        elif not self.state.pending:
            self._commit(dict(self.offsets.uncommitted))
        self._report_item_drift()
        self._refresh_content()
        if self.on_flush is not None:
            self.on_flush(self)
        return True

    def _refresh_content(self) -> None:
        if not self.config.topics.item_metadata or time.monotonic() < self._next_content_refresh:
            return
        self._next_content_refresh = time.monotonic() + self.config.content.refresh_interval_s
        with self.model_lock:
            refreshed = self.state.refresh_cold_items(self.config.content.cold_count)
        if refreshed:
            self.stats.cold_items_refreshed += refreshed
            self._state_changed = True
            log.info("content vectors for %d cold item(s)", refreshed)

    def _report_item_drift(self) -> None:
        current = self.refresher.current
        if current is None or current.version == self._reported_index_version:
            return
        self._reported_index_version = current.version
        self.stats.item_drift = self.refresher.item_drift
        if self.item_drift_alarm.update(self.stats.item_drift, self.refresher.item_drift_items):
            log.warning("drift: item vectors moved by a mean cosine distance of %.3f between index builds "
                        "(threshold %.3f, and over twice the build before); retrain/reindex recommended",
                        self.stats.item_drift, self.config.monitor.item_drift_threshold)

    def _checkpoint(self, wait: bool) -> None:
        """Snapshot the state and write it in the background (or now, if ``wait``); commit when written."""
        if self.writer.busy:
            if not wait:
                return  # the previous one is still being written: try again at the next flush
            self.writer.wait()
            self._collect_checkpoint()
        self._next_checkpoint = time.monotonic() + self.config.checkpoint.interval_s
        if self._state_changed:
            started = time.monotonic()
            current = self.refresher.current
            self.state.index_version = current.version if current else self.state.index_version
            # What the checkpoint covers, for the partitions this member may commit for.
            covered = {tp: self.state.positions[f"{tp[0]}/{tp[1]}"] for tp in self.stats.assigned
                       if f"{tp[0]}/{tp[1]}" in self.state.positions}
            # The writer's child sees the state as of now (a fork): no copy needed here.
            self.writer.start(lambda: self.state.snapshot(copy=False), payload=(covered, self.model.events_applied))
            self._state_changed = False
            self.stats.last_checkpoint_s = time.monotonic() - started
        if wait:
            self.writer.wait()
            self._collect_checkpoint()

    def _collect_checkpoint(self) -> None:
        outcome = self.writer.take_outcome()
        if outcome is None:
            self._commit_checkpointed()
            return
        (covered, events), path, error = outcome
        if error is not None:
            # The previous checkpoint stays the valid one; nothing is committed past it.
            log.error("checkpoint failed (%s); offsets not committed, retrying at the next interval", error)
            self._state_changed = True
            return
        self._checkpointed_events = events
        self.stats.checkpoints += 1
        log.info("checkpoint %s: %d events (snapshot %.2fs)", path.name, events, self.stats.last_checkpoint_s)
        self.offsets.checkpoint_written(covered)
        self._commit_checkpointed()

    def _commit_checkpointed(self) -> None:
        """Commit what the newest written checkpoint covers and the group does not have yet
        (``OffsetBook.to_commit``)."""
        self._commit(self.offsets.to_commit(set(self.stats.assigned)))

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                 asynchronous=False)
        except KafkaException as exc:
            # E.g. the group rebalanced or the broker is away. With a state dir the checkpoint
            # already holds these offsets; without one the events will be read again.
            log.warning("commit failed (%s); will retry with the next flush", exc.args[0])
            return
        self.offsets.committed(offsets)
        if self.store is not None:
            try:
                self.store.record_commit({f"{t}/{p}": o for (t, p), o in offsets.items()})
            except OSError as exc:
                # The commit itself succeeded; only the note that it was ours is missing. It matters
                # only after a fall back to an older checkpoint (see _start_offsets).
                log.error("committed, but could not record it in %s (%s)", self.store.directory, exc)
        self.stats.commits += 1

    def _publish_updates(self, limit: int) -> np.ndarray:
        """Publish updates for the ``limit`` longest-waiting users; returns their latest event times."""
        user_rows, last_event_ts = self.state.pending.take(limit)
        index = self.refresher.current
        with self.model_lock:
            # Behind, every lookup delays the catch-up: the hot set alone answers until it is over.
            top = self.recommender.recommend(user_rows, index, self.stats.last_event_ts, use_index=not self._behind)
            model_version = self.model.model_version
            values, ends = update_values(self.model.users.ids, self.model.items.ids, top.user_rows, top.item_rows,
                                         top.scores, last_event_ts, index.version if index else 0, model_version,
                                         _now_ms())
            user_ids = self.model.users.ids.ids
        topic = self.config.topics.output
        start = 0
        for user, end in zip(top.user_rows.tolist(), ends.tolist()):
            self._produce(topic, user_ids[user].encode(), values[start:end])
            start = end
        self.stats.updates_published += len(top)
        return np.asarray(last_event_ts, dtype=np.int64)

    def _deliver_all(self, patient: bool = True) -> bool:
        """Wait until everything produced is delivered (``OutputProducer.deliver_all``). While
        deliveries fail, consumption is paused but the consumer keeps polling, so it stays in its
        group instead of being timed out of it."""
        paused = False

        def wait(seconds: float) -> None:
            nonlocal paused
            if not paused and self.consumer is not None:
                self.consumer.pause(self.consumer.assignment())
                paused = True
            self._wait_in_group(seconds)

        try:
            return self.output.deliver_all(self.config.output.delivery_timeout_s, patient, self.stop.is_set, wait)
        finally:
            if paused:
                self.consumer.resume(self.consumer.assignment())

    def _wait_in_group(self, seconds: float) -> None:
        self._retrying_delivery = True
        try:
            deadline = time.monotonic() + seconds
            while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
                self.last_loop_turn = time.monotonic()
                if self.consumer is None:
                    self.stop.wait(left)
                    return
                messages = self.consumer.consume(self.config.loop.batch_size, min(left, 0.5))
                if messages:  # from partitions assigned meanwhile (paused ones deliver nothing)
                    self._process(messages)
        finally:
            self._retrying_delivery = False

    # -- rebalance -----------------------------------------------------------------------------

    def _forget_recreated_topics(self, topics: set[str]) -> set[str]:
        """Topics of ``topics`` deleted and created again since the state last saw them (their id
        changed): their offsets start again at 0, so the state's positions in them mean nothing.
        Forgets those positions, says so, and returns the topics (read from their start)."""
        ids = topic_ids(self._admin, sorted(topics)) if self._admin is not None else {}
        recreated = {t for t, i in ids.items() if self.state.topic_ids.get(t, i) != i}
        for topic in sorted(recreated):
            stale = {k: v for k, v in self.state.positions.items() if k.rsplit("/", 1)[0] == topic}
            log.error("input topic %s was deleted and created again (id %s in the state, %s now): its offsets "
                      "start again at 0, so the state's positions %s mean nothing there. Reading it from its "
                      "start; the model keeps what it learned. (To start over instead, use a new --state-dir.)",
                      topic, self.state.topic_ids[topic], ids[topic], stale)
            for key in stale:
                del self.state.positions[key]
        if ids != {t: self.state.topic_ids.get(t) for t in ids}:
            self.state.topic_ids.update(ids)
            self._state_changed = True
        return recreated

    def _start_offsets(self, partitions: list[TopicPartition]) -> None:
        """Set where each newly assigned partition resumes (in place)."""
        recreated = self._forget_recreated_topics({tp.topic for tp in partitions})
        committed = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.committed(partitions, timeout=30)}
        our_commits = self.store.last_commits() if self.store is not None else {}
        start = self.config.topics.start_from
        unknown = []
        for tp in partitions:
            key = f"{tp.topic}/{tp.partition}"
            position = self.state.positions.get(key)
            group_offset = committed.get((tp.topic, tp.partition), -1)
            ours = our_commits.get(key) == group_offset
            if tp.topic in recreated:
                tp.offset = OFFSET_BEGINNING  # the group's offsets, if any, were the old topic's
            elif position is not None:
                tp.offset = resume_offset(position, group_offset, ours)
            elif start == "earliest":
                tp.offset = OFFSET_BEGINNING
            elif start == "latest":
                tp.offset = OFFSET_END
            elif start.isdigit():
                tp.offset = int(start)
                unknown.append(tp)
        if unknown:  # timestamps to offsets (relies on the broker's time index)
            found = self.consumer.offsets_for_times(unknown, timeout=30)
            by_key = {(tp.topic, tp.partition): tp.offset for tp in found}
            for tp in unknown:
                tp.offset = by_key[(tp.topic, tp.partition)]
        for tp in partitions:
            if tp.offset >= 0:
                # The state continues from here: checkpoints and commits must not go back before it.
                key = f"{tp.topic}/{tp.partition}"
                if self.state.positions.get(key) != tp.offset:
                    # A jump past events another member applied: the next checkpoint records it
                    # even if no event follows (else the stored position stays behind).
                    self._state_changed = True
                self.state.positions[key] = tp.offset
                if self.offsets.resumed((tp.topic, tp.partition), tp.offset,
                                        committed.get((tp.topic, tp.partition), -1), self.store is not None):
                    self._state_changed = True

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.stop.is_set():
            # Assigned while closing (a rebalance met our SIGTERM): the consumer is being destroyed,
            # so the group's offsets cannot be read; the client assigns and close() revokes them,
            # with nothing of ours to commit for them. Their next owner takes them from the group.
            log.info("assigned %s while stopping: left to their next owner", [f"{p.topic}/{p.partition}" for p in partitions])
            return
        self._take_over(partitions)
        self._start_offsets(partitions)
        cooperative = "cooperative" in self._client_configs()[0].get("partition.assignment.strategy", "")
        if cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if self._retrying_delivery:
            # Output is down: read nothing new until it is back (resumed in _deliver_all).
            consumer.pause(partitions)
        self.stats.assigned = sorted(set(self.stats.assigned) | {(p.topic, p.partition) for p in partitions})
        log.info("assigned %s", [f"{p.topic}/{p.partition}@{_OFFSET_NAMES.get(p.offset, p.offset)}" for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", [f"{p.topic}/{p.partition}" for p in partitions])
        if self._retrying_delivery:
            # Output is down: nothing past the last commit may be committed. The next owner
            # reads these partitions from the committed offsets.
            log.warning("revoked while output deliveries fail: leaving their offsets uncommitted")
        elif not self.flush(checkpoint=True, patient=False):
            log.warning("revoked with output undelivered: leaving their offsets uncommitted")
        elif self.membership is not None:
            # Checkpointed and committed: the next owner resumes right there.
            if self.membership.hand_over(partitions, lambda: self._deliver_all(patient=False)):
                self._state_changed = True
                if self.store is not None:
                    # A restart must not bring the handed-over users back from the last checkpoint.
                    self._checkpoint(wait=True)
        gone = {(p.topic, p.partition) for p in partitions}
        self.offsets.gone(gone)
        self.stats.assigned = [tp for tp in self.stats.assigned if tp not in gone]

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may already own these: committing for them now would be wrong.
        gone = {(p.topic, p.partition) for p in partitions}
        log.warning("lost %s; their uncommitted offsets will be re-read by the new owner", sorted(gone))
        self.offsets.gone(gone)
        self.stats.assigned = [tp for tp in self.stats.assigned if tp not in gone]
