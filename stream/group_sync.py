"""Sharing item state across the members of a consumer group through a Kafka topic.

Every member reads the whole sync topic with ``assign()`` (outside the consumer group, so that
every member sees every member's deltas) and adds the others' deltas to its items; every
``sync.interval_s`` it sends what it changed itself (embeddings/sync.py has the arithmetic).

Where this member stands in the sync topic is state like its input positions: checkpoints record
it with the item base, so a restarted member reads again exactly the deltas its restored items
lack, and reads back its own deltas sent after the checkpoint (see ``ItemSync.apply``). Messages
are keyed by member, so one member's deltas stay in order on one partition.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from recstream.embeddings.sync import InvalidDelta, ItemDelta, ItemSync

log = logging.getLogger(__name__)

# Sync messages read per loop turn: a burst of deltas (a member's start-up, a late joiner)
# is spread over turns instead of stalling the input for its whole length.
_MESSAGES_PER_TURN = 50


def member_id(configured: str, state_dir: str) -> str:
    """This member's name in the group: the configured one, else one kept in the state dir (made on
    first start, so that it survives restarts: a restarted member must recognise its own deltas),
    else a new one per process (without a state dir nothing survives a restart anyway)."""
    if configured:
        return configured
    if not state_dir:
        return uuid.uuid4().hex[:12]
    path = Path(state_dir) / "sync-member"
    if path.exists():
        return path.read_text().strip()
    name = uuid.uuid4().hex[:12]
    path.write_text(name + "\n")
    return name


class GroupSync:
    """This member's reader and sender of the group's sync topic.

    ``positions`` (``"topic/partition"`` -> next offset) is the state's own dict, updated in place;
    ``produce(topic, key, value)`` is the service's producer wrapper (its retries and delivery
    waits cover sync messages as they cover output); ``dead_letter(message, reason)`` takes a
    message that cannot be applied.
    """

    def __init__(self, topic: str, interval_s: float, item_sync: ItemSync, positions: dict[str, int],
                 consumer_config: dict, produce: Callable[[str, bytes, bytes], None],
                 dead_letter: Callable[[Message, str], None], clicks_interval_s: float | None = None) -> None:
        self.topic = topic
        self.interval_s = interval_s
        self.clicks_interval_s = clicks_interval_s or interval_s
        self.item_sync = item_sync
        self.positions = positions
        self._consumer_config = consumer_config
        self._produce = produce
        self._dead_letter = dead_letter
        self._consumer: Consumer | None = None
        self._next_send = time.monotonic() + interval_s
        self._next_clicks = time.monotonic() + self.clicks_interval_s
        self.sends = 0

    def start(self, timeout_s: float = 30.0) -> None:
        """Assign every partition of the sync topic at this member's positions (the start of the
        topic for a member that has none)."""
        self._consumer = Consumer(self._consumer_config)
        metadata = self._consumer.list_topics(self.topic, timeout=timeout_s)
        partitions = sorted(metadata.topics[self.topic].partitions)
        assignment = [TopicPartition(self.topic, p, self.positions.get(f"{self.topic}/{p}", OFFSET_BEGINNING))
                      for p in partitions]
        self._consumer.assign(assignment)
        log.info("item sync: member %s reading %s (%d partition(s)) every turn, sending every %.1fs",
                 self.item_sync.member, self.topic, len(partitions), self.interval_s)

    def end_offsets(self, timeout_s: float = 10.0) -> dict[str, int]:
        """The sync topic's current end, per partition (where a catch-up is complete)."""
        ends = {}
        for tp in self._consumer.assignment():
            _, high = self._consumer.get_watermark_offsets(tp, timeout=timeout_s)
            ends[f"{tp.topic}/{tp.partition}"] = high
        return ends

    def catch_up(self, lock, timeout_s: float) -> int:
        """Apply every delta already on the topic (a restarted member's own later ones included)
        before this member sends anything; returns the items moved."""
        ends = self.end_offsets()
        deadline = time.monotonic() + timeout_s
        moved = 0
        while any(self.positions.get(key, 0) < end for key, end in ends.items() if end > 0):
            if time.monotonic() > deadline:
                log.warning("item sync: catch-up stopped after %.0fs at %s of %s", timeout_s, self.positions, ends)
                break
            moved += self.poll(lock, timeout_s=0.5, max_messages=1000)
        return moved

    def poll(self, lock, timeout_s: float = 0.0, max_messages: int = _MESSAGES_PER_TURN) -> int:
        """Apply the deltas that have arrived (bad ones go to the dead letters); returns the items moved."""
        messages = self._consumer.consume(max_messages, timeout_s)
        moved = 0
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("item sync: consumer error: %s", error)
                continue
            try:
                delta = ItemDelta.decode(message.value() or b"")
                with lock:
                    moved += self.item_sync.apply(delta)
            except InvalidDelta as exc:
                self._dead_letter(message, f"bad item delta: {exc}")
            self.positions[f"{message.topic()}/{message.partition()}"] = message.offset() + 1
        return moved

    def due(self) -> bool:
        """Whether the items are due (every ``interval_s``)."""
        return time.monotonic() >= self._next_send

    def clicks_due(self) -> bool:
        """Whether the session clicks are due on their own (every ``clicks_interval_s``)."""
        return self.item_sync.sessions is not None and time.monotonic() >= self._next_clicks

    def send(self, lock, items: bool = True) -> int:
        """Send this member's changes since its last send (``items=False``: its session clicks
        alone); returns the items sent."""
        now = time.monotonic()
        self._next_clicks = now + self.clicks_interval_s
        if items:
            self._next_send = now + self.interval_s
        with lock:
            deltas = self.item_sync.take(items=items)
        key = self.item_sync.member.encode()
        for delta in deltas:
            self._produce(self.topic, key, delta.encode())
        if deltas:
            self.sends += 1
        return sum(len(d.ids) for d in deltas)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
