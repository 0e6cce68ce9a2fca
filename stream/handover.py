"""A partition's users go with the partition: handed over through a Kafka topic at a rebalance.

Users are partitioned like the input (events keyed by user id), so a partition's users are the
users whose latest event came from it. When a member gives a partition up (revoke: it has just
published, checkpointed and committed), it writes those users' state to partition ``p`` of the
group's user-state topic, in chunks keyed ``"<p>/<chunk>"`` and then a marker keyed
``"<p>/marker"`` naming the handover, its chunk count and the input offset the state reflects, and
forgets them. The member that gets the partition reads that partition of the topic, takes the
chunks of the last marker's handover and, if the marker's offset is where the partition resumes
(the group's committed offset), takes the users over with the vectors and histories they had.

Keys are fixed per partition and chunk, so the topic can be compacted (``recstream topics
--group-id`` creates it so): it then holds about one handover per partition. Item references
(last item, histories, sessions) travel as item ids; a session continues under a new local
session number. What does not travel: a crashed member writes no handover, so its partitions'
users start over on a new owner unless the member itself comes back for them (static membership,
``group.instance.id``, keeps a restarted member's partitions: see deploy/).
"""

from __future__ import annotations

import logging
import uuid

import msgspec
import numpy as np
from recstream.stream.broker import read_partition
from recstream.stream.state import RecState

log = logging.getLogger(__name__)

# A chunk's size: under Kafka's default limit of 1 MB per message. A user with a long history
# takes a few kB (its history's item ids), so chunks are cut by size, not by a count of users.
CHUNK_BYTES = 500_000


class UserChunk(msgspec.Struct, frozen=True):
    """Some users of one partition, as handed over (little-endian arrays, ids as strings)."""

    handover: str
    partition: int
    chunk: int
    dim: int
    users: list[str]
    vectors: bytes  # float32 (users, dim)
    short: bytes  # float32 (users, dim): short-term interest
    scalars: dict[str, bytes]  # per-user scalar arrays of the model, by name (see OnlineMF.user_state)
    last_items: list[str]  # "" where none
    history_counts: bytes  # int64 (users,)
    history_items: list[str]  # oldest first, user after user
    session_counts: bytes  # int64 (users,): clicks of the current session held (<= session_length)
    session_items: list[str]
    session_times: bytes  # int64 (users,): last event time of the session
    session_keys: bytes  # int64 (users,)


class Marker(msgspec.Struct, frozen=True):
    """The end of a complete handover of one partition."""

    handover: str
    partition: int
    chunks: int
    offset: int  # the input partition's next offset the handed-over state reflects


_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE_CHUNK = msgspec.msgpack.Decoder(UserChunk).decode
_DECODE_MARKER = msgspec.msgpack.Decoder(Marker).decode


def _ids(table_ids, rows: np.ndarray) -> list[str]:
    """Item ids of ``rows`` ("" for -1)."""
    valid = rows >= 0
    names = table_ids.ids_of(rows[valid].tolist())
    out = [""] * len(rows)
    for position, name in zip(np.flatnonzero(valid).tolist(), names):
        out[position] = name
    return out


def export_users(state: RecState, rows: np.ndarray, handover: str, partition: int, chunk: int) -> UserChunk:
    """The state of the users of ``rows`` (see :class:`UserChunk`)."""
    model, item_ids = state.model, state.model.items.ids
    learned = model.user_state(rows)
    history_counts, history = state.history.gather(rows)
    sessions = state.sessions
    sessions.fit(int(rows.max()) + 1 if len(rows) else 0, 0)
    length = sessions.hist.shape[1]
    held = np.minimum(sessions.hlen[rows], length)
    # The ring's valid clicks in order: the last ``held`` of ``hlen`` clicks.
    order = [sessions.hist[u, (sessions.hlen[u] - m + np.arange(m)) % length] for u, m in
             zip(rows.tolist(), held.tolist())]
    clicks = np.concatenate(order).astype(np.int64) if order else np.zeros(0, np.int64)
    return UserChunk(
        handover, partition, chunk, model.config.dim, model.users.ids.ids_of(rows.tolist()),
        learned.pop("vectors").astype("<f4").tobytes(), learned.pop("short_vectors").astype("<f4").tobytes(),
        {name: values.tobytes() for name, values in learned.items() if name != "last_item"},
        _ids(item_ids, learned["last_item"]), history_counts.astype("<i8").tobytes(), _ids(item_ids, history),
        held.astype("<i8").tobytes(), _ids(item_ids, clicks), sessions.last_ts[rows].astype("<i8").tobytes(),
        sessions.skey[rows].astype("<i8").tobytes())


def import_users(state: RecState, chunk: UserChunk) -> np.ndarray:
    """Take the users of ``chunk`` over (replacing what this member held for them); returns their rows."""
    model = state.model
    rows = model.users.rows(chunk.users)
    n, dim = len(rows), chunk.dim
    scalars = {name: np.frombuffer(data, dtype=model.user_state_dtype(name)) for name, data in chunk.scalars.items()}
    # Their place in this member's input: now (the sender's count of its own events means nothing here).
    scalars["last_seq"] = np.full(n, model.events_applied, dtype=np.int64)
    last = np.full(n, -1, dtype=np.int64)
    named = [k for k, item in enumerate(chunk.last_items) if item]
    if named:
        last[named] = model.items.rows([chunk.last_items[k] for k in named])
    model.set_user_state(rows, {"vectors": np.frombuffer(chunk.vectors, "<f4").reshape(n, dim),
                                "short_vectors": np.frombuffer(chunk.short, "<f4").reshape(n, dim),
                                "last_item": last, **scalars})
    counts = np.frombuffer(chunk.history_counts, "<i8")
    state.history.forget(rows)
    if len(chunk.history_items):
        state.history.add(np.repeat(rows, counts), model.items.rows(chunk.history_items))
    sessions = state.sessions
    sessions.forget(rows)
    held = np.frombuffer(chunk.session_counts, "<i8")
    clicks = model.items.rows(chunk.session_items) if chunk.session_items else np.zeros(0, np.int64)
    sessions.fit(int(rows.max()) + 1 if n else 0, int(clicks.max()) + 1 if len(clicks) else 0)
    starts = np.concatenate([[0], np.cumsum(held)])
    for k, u in enumerate(rows.tolist()):
        m = int(held[k])
        if m:
            sessions.hist[u, :m] = clicks[starts[k]:starts[k + 1]]
            sessions.hlen[u] = m
            sessions.next_serial[0] += 1
            sessions.serial[u] = sessions.next_serial[0]
    sessions.last_ts[rows] = np.frombuffer(chunk.session_times, "<i8")
    sessions.skey[rows] = np.frombuffer(chunk.session_keys, "<i8")
    # Their items new here count as active now (bounded memory: model.max_items, item_ttl_s).
    state.items_arrived(np.concatenate([last[last >= 0], state.history.gather(rows)[1], clicks]))
    return rows


class UserHandover:
    """Writes and reads a group's user-state topic (``topic``; one partition per input partition)."""

    def __init__(self, topic: str, consumer_config: dict, produce) -> None:
        self.topic = topic
        self._consumer_config = consumer_config
        self._produce = produce  # the service's producer wrapper: (topic, key, value, partition=) -> None

    def write(self, state: RecState, partition: int, rows: np.ndarray, offset: int) -> int:
        """Hand over ``rows`` (the partition's users) as of input ``offset``; returns the chunks."""
        handover = uuid.uuid4().hex[:12]
        chunks = 0
        pending = [rows[start:start + 1000] for start in range(0, len(rows), 1000)]  # then halved while too big
        while pending:
            part = pending.pop(0)
            data = _ENCODE(export_users(state, part, handover, partition, chunks))
            if len(data) > CHUNK_BYTES and len(part) > 1:  # too big: halve it (in order)
                half = len(part) // 2
                pending[:0] = [part[:half], part[half:]]
                continue
            self._produce(self.topic, f"{partition}/{chunks}".encode(), data, partition=partition)
            chunks += 1
        self._produce(self.topic, f"{partition}/marker".encode(),
                      _ENCODE(Marker(handover, partition, chunks, offset)), partition=partition)
        return chunks

    def read(self, partition: int, timeout_s: float = 60.0) -> tuple[Marker | None, list[UserChunk]]:
        """The last complete handover of ``partition``: its marker and chunks (None, [] if none)."""
        config = {**self._consumer_config, "group.id": f"{self._consumer_config.get('group.id', 'recstream')}.handover"}
        chunks: dict[tuple[str, int], UserChunk] = {}
        marker: Marker | None = None
        try:
            for m in read_partition(config, self.topic, partition, timeout_s):
                try:
                    if (m.key() or b"").endswith(b"/marker"):
                        marker = _DECODE_MARKER(m.value())
                    else:
                        chunk = _DECODE_CHUNK(m.value())
                        chunks[(chunk.handover, chunk.chunk)] = chunk
                except msgspec.DecodeError as exc:
                    log.error("user handover: unreadable record at %s/%d@%d (%s)", m.topic(), m.partition(),
                              m.offset(), exc)
        except TimeoutError as exc:
            log.warning("user handover: %s; the users of partition %d start over", exc, partition)
            return None, []
        if marker is None:
            return None, []
        found = [chunks.get((marker.handover, k)) for k in range(marker.chunks)]
        if any(chunk is None for chunk in found):
            log.error("user handover of %s/%d is incomplete; its users start over", self.topic, partition)
            return None, []
        return marker, found
