"""The group's items as absolute values, for members that start late: a compacted topic.

A member that starts without sync state (a new member, a lost state dir) would otherwise build its
items from every delta ever sent, read from the start of ``<group>.item-deltas``: that needs the
deltas topic to keep everything forever. Instead, the member holding input partition 0 writes,
every ``sync.snapshot_interval_s``, its item *base* to ``<group>.item-snapshot``
(``ItemSync.snapshot``: every item's initial values plus every delta sent, as of its place in the
deltas topic; its own unsent learning is not in it). A member without sync state restores the
latest complete snapshot, then reads the deltas topic from the place the snapshot was taken at,
skipping the deltas it already includes; every event of the group still counts once on every
member (tested).

Records: the snapshot's chunks keyed ``"<slot>/<k>"``, then a ``"marker"`` naming the snapshot,
its slot and chunk count, the deltas-topic positions and the deltas it includes. A writer alternates
between two slots, so a write that stops half-way leaves the marker's snapshot whole; keys are
fixed, so a compacted topic holds about two snapshots. If the latest marker's chunks are not all
there (two writes in a row stopped half-way, or two members writing during a rebalance), the
member reads the deltas topic from its start, as without a snapshot.

Not in a snapshot: the session signals (a late member learns them from the clicks sent after it
joins, its own and the group's).
"""

from __future__ import annotations

import logging
import time
import uuid

import msgspec
from recstream.embeddings.sync import InvalidDelta, ItemDelta, ItemSync
from recstream.stream.broker import read_partition

log = logging.getLogger(__name__)


class SnapshotChunk(msgspec.Struct, frozen=True):
    """Some items of one snapshot, their absolute values in an ``ItemDelta``'s layout."""

    snapshot: str
    items: ItemDelta


class SnapshotMarker(msgspec.Struct, frozen=True):
    """The end of a complete snapshot."""

    snapshot: str
    slot: int
    chunks: int
    member: str  # who wrote it
    positions: dict[str, int]  # the deltas topic's next offsets ("topic/partition") it reflects
    included: dict[str, tuple[int, int]]  # per member, the (sequence, part) of its last delta included
    written_ms: int


_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE_CHUNK = msgspec.msgpack.Decoder(SnapshotChunk).decode
_DECODE_MARKER = msgspec.msgpack.Decoder(SnapshotMarker).decode


class ItemSnapshots:
    """Writes and reads a group's item-snapshot topic (one partition)."""

    def __init__(self, topic: str, consumer_config: dict, produce) -> None:
        self.topic = topic
        self._consumer_config = consumer_config
        self._produce = produce  # the service's producer wrapper: (topic, key, value) -> None
        self._slot = 0  # the slot the next write uses
        self.written = 0

    def write(self, item_sync: ItemSync, positions: dict[str, int], lock) -> int:
        """Write this member's base as a snapshot; returns the items in it."""
        with lock:  # (a consistent copy: the base and the positions move together)
            chunks, included = item_sync.snapshot()
            positions = dict(positions)
        snapshot, slot = uuid.uuid4().hex[:12], self._slot
        for k, chunk in enumerate(chunks):
            self._produce(self.topic, f"{slot}/{k}".encode(), _ENCODE(SnapshotChunk(snapshot, chunk)))
        self._produce(self.topic, b"marker", _ENCODE(SnapshotMarker(snapshot, slot, len(chunks), item_sync.member,
                                                                    positions, included, int(time.time() * 1000))))
        self._slot = 1 - slot
        self.written += 1
        return sum(len(chunk.ids) for chunk in chunks)

    def read_latest(self, timeout_s: float = 120.0) -> tuple[SnapshotMarker | None, list[ItemDelta]]:
        """The latest complete snapshot: its marker and chunks (None, [] if there is none)."""
        config = {**self._consumer_config, "group.id": f"{self._consumer_config.get('group.id', 'recstream')}.snapshot"}
        latest: dict[bytes, bytes] = {}  # key -> its last value (what compaction keeps)
        try:
            for m in read_partition(config, self.topic, 0, timeout_s):
                latest[m.key() or b""] = m.value() or b""
        except TimeoutError as exc:
            log.warning("item snapshot: %s; reading the deltas from their start", exc)
            return None, []
        if b"marker" not in latest:
            return None, []
        try:
            marker = _DECODE_MARKER(latest[b"marker"])
            found = [latest.get(f"{marker.slot}/{k}".encode()) for k in range(marker.chunks)]
            chunks = [_DECODE_CHUNK(data) if data is not None else None for data in found]
            chunks = [chunk.items.checked() if chunk is not None and chunk.snapshot == marker.snapshot else None
                      for chunk in chunks]
        except (msgspec.DecodeError, InvalidDelta) as exc:
            log.error("item snapshot: unreadable record in %s (%s); reading the deltas from their start", self.topic, exc)
            return None, []
        if any(chunk is None for chunk in chunks):
            log.error("item snapshot %s in %s is incomplete; reading the deltas from their start", marker.snapshot,
                      self.topic)
            return None, []
        self._slot = 1 - marker.slot  # (a writer here keeps the marker's snapshot whole)
        return marker, chunks
