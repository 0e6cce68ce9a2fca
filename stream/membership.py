"""What a member of a consumer group shares with the others (``[sync]``): item state and users.

Two parts, each on when its topic exists (``sync.mode: auto``) or required (``on``):

- **items** (``stream/group_sync.py``): every member adds up every member's item deltas, read
  from ``<group>.item-deltas``; at start a member catches up with the deltas already sent, from
  the group's latest item snapshot (``stream/item_snapshot.py``, ``<group>.item-snapshot``,
  written by the member holding input partition 0) if it has no place in the deltas yet;
- **users** (``stream/handover.py``): the users of a revoked partition are written to
  ``<group>.user-state`` for its next owner, who takes them over when they reflect exactly the
  offset the partition resumes at, and drops stale copies of users another member moved on.

The service's loop calls :meth:`GroupMembership.turn` once per poll, and its rebalance handlers
delegate to :meth:`hand_over` and :meth:`take_over`; all state changes happen under the model
lock the service passes in. docs/scale-out.md has the design and what is exact.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from confluent_kafka import Message, TopicPartition
from recstream.stream.config import ConfigError, ServiceConfig
from recstream.stream.group_sync import GroupSync, member_id
from recstream.stream.handover import UserHandover, import_users
from recstream.stream.item_snapshot import ItemSnapshots
from recstream.stream.state import RecState

log = logging.getLogger(__name__)


def _required_topic(config: ServiceConfig, what: str, topic: str, existing: set[str]) -> bool:
    """Whether a ``[sync]`` part whose topic is ``topic`` runs: per ``sync.mode``, and a missing
    topic that ``on`` requires stops start-up naming the setting."""
    mode = config.sync.mode
    if mode == "off" or (mode == "auto" and topic not in existing):
        return False
    if topic not in existing:
        raise ConfigError(f"sync.mode: on, but the {what} topic {topic!r} does not exist on {config.bootstrap_servers} "
                          f"(create it: `recstream topics --group-id {config.topics.group_id}`)")
    return True


class GroupMembership:
    """This member's share of the group's model: item deltas sent and received, users handed over
    and taken over.

    ``produce(topic, key, value[, headers, partition])`` and ``dead_letter(message, reason)`` are the
    service's producer wrapper and dead-letter path; ``stats`` gets the counters
    (``sync_items_sent``, ``sync_items_received``, ``sync_clicks_*``, ``users_handed_over``, ``users_taken_over``).
    """

    def __init__(self, config: ServiceConfig, state: RecState, model_lock: threading.Lock, stats: Any,
                 items: GroupSync | None, users: UserHandover | None, snapshots: ItemSnapshots | None = None) -> None:
        self.config = config
        self.state = state
        self.model_lock = model_lock
        self.stats = stats
        self.snapshots = snapshots
        self._next_snapshot = time.monotonic() + config.sync.snapshot_interval_s
        self.items = items
        self.users = users

    @classmethod
    def join(cls, config: ServiceConfig, state: RecState, model_lock: threading.Lock, stats: Any, metadata,
             consumer_config: dict, produce: Callable[..., None],
             dead_letter: Callable[[Message, str], None]) -> GroupMembership | None:
        """Start what ``[sync]`` asks for with the cluster's ``metadata`` (None: nothing is shared).
        Item sync catches up with the deltas already sent before this returns."""
        existing = set(metadata.topics)
        items = users = snapshots = None
        if _required_topic(config, "sync", config.sync_topic, existing):
            member = member_id(config.sync.member, config.state_dir)
            sync_consumer = {**consumer_config, "group.id": f"{config.topics.group_id}.sync.{member}"}
            items = GroupSync(config.sync_topic, config.sync.interval_s, state.enable_item_sync(member, config.sync.sessions),
                              state.sync_positions, sync_consumer, produce, dead_letter, config.sync.clicks_interval_s)
            if config.item_snapshot_topic in existing:  # (optional: groups made before it have none)
                snapshots = ItemSnapshots(config.item_snapshot_topic, sync_consumer, produce)
                if not state.sync_positions:  # no place in the deltas yet: start from the group's items
                    stats.sync_snapshot_items = _restore_snapshot(snapshots, state, model_lock)
            items.start()
            started = time.monotonic()
            moved = items.catch_up(model_lock, config.sync.catch_up_timeout_s)
            stats.sync_items_received += moved
            log.info("item sync: caught up with the group in %.1fs (%d item deltas applied)",
                     time.monotonic() - started, moved)
        if _required_topic(config, "user-state", config.user_state_topic, existing):
            have = len(metadata.topics[config.user_state_topic].partitions)
            need = len(metadata.topics[config.topics.input].partitions)
            if have < need:
                raise ConfigError(f"sync.mode: the user-state topic {config.user_state_topic!r} has {have} "
                                  f"partition(s), the input {need}: it needs one per input partition")
            users = UserHandover(config.user_state_topic, consumer_config, produce)
        if items is None and users is None:
            return None
        return cls(config, state, model_lock, stats, items, users, snapshots)

    def turn(self) -> tuple[bool, bool]:
        """Once per loop turn: apply the group's item deltas that have arrived, and send ours when
        the interval is up (the session clicks alone when theirs is). Returns (items moved,
        anything to checkpoint changed)."""
        if self.items is None:
            return False, False
        read = dict(self.state.sync_positions)
        moved = self.items.poll(self.model_lock)
        self.stats.sync_items_received += moved
        sent, clicks = 0, self.items.item_sync.sent_clicks
        if self.items.due():
            sent = self.items.send(self.model_lock)
        elif self.items.clicks_due():
            self.items.send(self.model_lock, items=False)
        self.stats.sync_items_sent += sent
        self._count_clicks()
        self._write_snapshot()
        # The item base, the clicks sent and the sync positions are checkpointed.
        return moved > 0, bool(sent) or clicks != self.items.item_sync.sent_clicks or read != self.state.sync_positions

    def send_last(self) -> None:
        """At a clean stop: the group gets this member's last changes (the final checkpoint counts them sent)."""
        if self.items is not None:
            self.stats.sync_items_sent += self.items.send(self.model_lock)
            self._count_clicks()

    def _write_snapshot(self) -> None:
        """Every ``sync.snapshot_interval_s``, on the member holding input partition 0 (one writer
        per group, but for the moments of a rebalance): the group's items for members that start late."""
        interval = self.config.sync.snapshot_interval_s
        if self.snapshots is None or not interval or time.monotonic() < self._next_snapshot:
            return
        self._next_snapshot = time.monotonic() + interval
        if (self.config.topics.input, 0) not in self.stats.assigned:
            return
        started = time.monotonic()
        written = self.snapshots.write(self.items.item_sync, self.state.sync_positions, self.model_lock)
        self.stats.sync_snapshots_written += 1
        log.info("item snapshot: wrote %d items to %s in %.2fs", written, self.snapshots.topic,
                 time.monotonic() - started)

    def _count_clicks(self) -> None:
        item_sync = self.items.item_sync
        self.stats.sync_clicks_sent, self.stats.sync_clicks_received = item_sync.sent_clicks, item_sync.received_clicks

    def hand_over(self, partitions: list[TopicPartition], deliver: Callable[[], bool]) -> bool:
        """Give up the users of ``partitions`` (just checkpointed and committed): write them to the
        user-state topic for the next owner, ``deliver()``, then forget them here. Returns whether
        any were handed over (the caller checkpoints, so a restart does not bring them back)."""
        if self.users is None:
            return False
        handed: list[tuple[TopicPartition, np.ndarray]] = []
        for tp in partitions:
            offset = self.state.positions.get(f"{tp.topic}/{tp.partition}")
            if tp.topic != self.config.topics.input or offset is None:
                continue
            with self.model_lock:
                rows = self.state.users_of_partition(tp.partition)
                self.users.write(self.state, tp.partition, rows, offset)
            handed.append((tp, rows))
        if not handed:
            return False
        if not deliver():
            log.warning("user handover undelivered: keeping the users of %s",
                        [f"{tp.topic}/{tp.partition}" for tp, _ in handed])
            return False
        with self.model_lock:
            for tp, rows in handed:
                self._drop_partition_users(f"{tp.topic}/{tp.partition}", rows)
                self.stats.users_handed_over += len(rows)
        log.info("handed over %s", ", ".join(f"{len(rows)} users of {tp.topic}/{tp.partition}" for tp, rows in handed))
        return True

    def take_over(self, partitions: list[TopicPartition], committed: Callable[[list[TopicPartition]], dict[int, int]],
                  our_commits: dict[str, int]) -> bool:
        """For newly assigned input ``partitions`` whose users this member does not hold as of where
        the partition resumes (``committed(partitions)``: partition -> the group's offset): drop stale
        copies, and take the users over from their last handover when it reflects exactly that
        offset. ``our_commits`` are the offsets this state dir committed. Returns whether the state
        changed."""
        partitions = [tp for tp in partitions if tp.topic == self.config.topics.input]
        if self.users is None or not partitions:
            return False
        resumes = committed(partitions)
        changed = False
        for tp in partitions:
            key, resume = f"{tp.topic}/{tp.partition}", resumes.get(tp.partition, -1)
            position = self.state.positions.get(key)
            if position is not None and (resume < 0 or position >= resume or our_commits.get(key) == resume):
                continue  # ours as of where it resumes (or we are ahead, or the group's offset is our own)
            if position is not None:
                # Another member went further since we held it: our copies of its users are stale.
                with self.model_lock:
                    rows = self.state.users_of_partition(tp.partition)
                    self._drop_partition_users(key, rows)
                changed = True
                log.info("%s moved on while another member held it: forgot %d stale users of it", key, len(rows))
            marker, chunks = self.users.read(tp.partition)
            if marker is None:
                continue
            if marker.offset != resume:
                log.warning("the users of %s were handed over at offset %d, but it resumes at %s: they start "
                            "over here", key, marker.offset, resume)
                continue
            with self.model_lock:
                taken = sum(len(import_users(self.state, chunk)) for chunk in chunks)
            self.stats.users_taken_over += taken
            changed = True
            log.info("took over %d users of %s (handed over at offset %d)", taken, key, marker.offset)
        return changed

    def _drop_partition_users(self, key: str, rows: np.ndarray) -> None:
        """This member no longer holds input partition ``key`` ("topic/partition"): forget its users
        (``rows``), their waiting updates and the position (model lock held)."""
        self.state.forget_users(rows)
        self.state.pending.forget(rows)
        del self.state.positions[key]

    def close(self) -> None:
        if self.items is not None:
            self.items.close()


def _restore_snapshot(snapshots: ItemSnapshots, state: RecState, model_lock: threading.Lock) -> int:
    """Start this member's items from the group's latest snapshot, and its place in the deltas
    topic from the snapshot's; returns the items restored (0: no snapshot)."""
    marker, chunks = snapshots.read_latest()
    if marker is None:
        return 0
    with model_lock:
        restored = state.item_sync.restore_snapshot(chunks, marker.included)
        state.sync_positions.update(marker.positions)
    log.info("item sync: started from %s's snapshot %s (%d items, deltas from %s)", marker.member, marker.snapshot,
             restored, marker.positions)
    return restored
