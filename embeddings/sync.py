"""Item state shared by the members of a consumer group: per-item deltas, summed.

Each member learns item vectors from the events of its own partitions. Every sync interval it
sends, for each item it changed, what changed since its last send, and adds what the others sent.
With :math:`\\hat q_i` the member's *base* for item :math:`i` (its value after the last send, plus
everything received since), a member sends

.. math::  \\Delta q_i = q_i - \\hat q_i, \\qquad \\hat q_i \\leftarrow q_i

(the same for the bias :math:`b_i`, the transition vector :math:`f_i` and the event count
:math:`n_i`) and on receiving another member's :math:`\\Delta q_i` sets

.. math::  q_i \\leftarrow q_i + \\Delta q_i, \\qquad \\hat q_i \\leftarrow \\hat q_i + \\Delta q_i.

Every member's item thus converges to its initial vector (the same everywhere: a function of the
id and the seed, see ``EmbeddingTable``) plus the sum of every member's steps: data-parallel SGD
whose partial sums arrive one interval late, as Monolith syncs its sparse embeddings. With one
member nothing is sent and nothing changes. Users are not synced: a user's events go to one
partition, so one member learns each user.

A delta is identified by its sender and a sequence number. A receiver applies each (sender,
sequence) once and ignores its own messages, except after a restart: a member restored from a
checkpoint reads back the deltas it sent after that checkpoint and counts them as sent (adds them
to its base, not to its vectors), so what it learns again from the replayed input is not sent
twice (see :meth:`ItemSync.apply`). Received values are checked (shape, finite) and the sums
clipped to the kernel's bounds, so no message can make the model non-finite.

>>> import numpy as np
>>> from recstream.embeddings.model import MFConfig, OnlineMF
>>> a, b = OnlineMF(MFConfig(dim=4, seed=1)), OnlineMF(MFConfig(dim=4, seed=1))
>>> sync_a, sync_b = ItemSync(a, "a"), ItemSync(b, "b")
>>> a.learn(["ann"] * 20, ["jazz"] * 20); b.learn(["bob"] * 20, ["jazz"] * 20)
>>> step_a = a.items.vectors[0] - a.items.initial_vectors(np.array([0]))[0]
>>> step_b = b.items.vectors[0] - b.items.initial_vectors(np.array([0]))[0]
>>> for message in sync_a.take(): _ = sync_b.apply(ItemDelta.decode(message.encode()))
>>> for message in sync_b.take(): _ = sync_a.apply(message)
>>> bool(np.allclose(a.items.vectors[0], b.items.vectors[0]))  # both hold start + both steps
True
>>> bool(np.allclose(a.items.vectors[0] - a.items.initial_vectors(np.array([0]))[0], step_a + step_b))
True
>>> int(a.interaction_counts(np.array([0]))[0])  # events on the item across the group
40
"""

from __future__ import annotations

import time

import msgspec
import numpy as np
from recstream.embeddings.model import OnlineMF
from recstream.embeddings.session import SessionSignals
from recstream.embeddings.sgd import MAX_COMPONENT, MAX_SCALAR

# A message's size: under Kafka's default limit of 1 MB per message (the broker's message.max.bytes).
MESSAGE_BYTES = 500_000
# Session clicks per message: 20 bytes each, and an id of up to ~40 bytes for each distinct item.
CLICKS_PER_MESSAGE = MESSAGE_BYTES // 64
_ALL_PARTS = 2**31  # (seq, _ALL_PARTS): every part of delta seq
_CLICK_CLOCK_TOLERANCE_S = 86_400.0  # clocks of members disagree; a day is no disagreement


def items_per_message(dim: int) -> int:
    """Items that fit a message at ``dim``: two float32 vectors, a bias, a count and an id each.

    >>> items_per_message(32), items_per_message(256)
    (1592, 237)
    """
    return max(1, MESSAGE_BYTES // (8 * dim + 58))  # 58: bias, count, an id of up to ~40 bytes, msgpack


class InvalidDelta(ValueError):
    """A sync message that cannot be applied (the reason is the message)."""


class ItemDelta(msgspec.Struct, frozen=True):
    """What one member changed on some items since its previous delta (little-endian arrays)."""

    member: str
    seq: int  # the sender's sequence number: (member, seq) identifies a delta
    part: int  # one send may take several messages: parts 0..parts-1 share member and seq
    parts: int
    dim: int
    ids: list[str]
    vectors: bytes  # float32 (len(ids), dim)
    transitions: bytes  # float32 (len(ids), dim)
    biases: bytes  # float32 (len(ids),)
    events: bytes  # int64 (len(ids),)
    # The sender's session clicks, in its order (a part carries items or clicks): each click's
    # session serial (int64), item (int32, an index into click_ids) and event time (int64, ms).
    click_ids: list[str] = []
    click_sessions: bytes = b""
    click_items: bytes = b""
    click_ts: bytes = b""

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> ItemDelta:
        """Parse and check a message; raises :class:`InvalidDelta` saying what is wrong."""
        try:
            delta = _DECODER.decode(data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise InvalidDelta(f"not an item delta: {exc}") from exc
        return delta.checked()

    def checked(self) -> ItemDelta:
        """This delta, if its arrays fit its ids and clicks and hold finite values; else raises
        :class:`InvalidDelta` saying what is wrong."""
        delta = self
        n, dim = len(delta.ids), delta.dim
        sizes = {"vectors": 4 * n * dim, "transitions": 4 * n * dim, "biases": 4 * n, "events": 8 * n}
        wrong = [f"{name} has {len(getattr(delta, name))} bytes, {n} items need {size}"
                 for name, size in sizes.items() if len(getattr(delta, name)) != size]
        clicks = len(delta.click_sessions) // 8
        sizes = {"click_sessions": 8 * clicks, "click_items": 4 * clicks, "click_ts": 8 * clicks}
        wrong += [f"{name} has {len(getattr(delta, name))} bytes, {clicks} clicks need {size}"
                  for name, size in sizes.items() if len(getattr(delta, name)) != size]
        items = delta.click_item_array() if not wrong else None
        if items is not None and len(items) and (items.min() < 0 or items.max() >= len(delta.click_ids)):
            wrong.append(f"click items outside the {len(delta.click_ids)} click ids")
        # A click from the far future would decay everything the session signals hold to nothing
        # (the member's own events are held to the clock on the way in: events.clock_tolerance_s).
        latest = int((time.time() + _CLICK_CLOCK_TOLERANCE_S) * 1000)
        if items is not None and len(items) and delta.click_ts_array().max() > latest:
            wrong.append(f"click times past this member's clock by more than {_CLICK_CLOCK_TOLERANCE_S:.0f} s")
        if wrong or dim < 1 or not 0 <= delta.part < delta.parts:
            raise InvalidDelta("; ".join(wrong) or f"bad dim {dim} or part {delta.part}/{delta.parts}")
        if not all(np.isfinite(a).all() for a in (delta.vector_array(), delta.transition_array(),
                                                  delta.bias_array())):
            raise InvalidDelta("non-finite values")
        return delta

    def vector_array(self) -> np.ndarray:
        return np.frombuffer(self.vectors, dtype="<f4").reshape(len(self.ids), self.dim)

    def transition_array(self) -> np.ndarray:
        return np.frombuffer(self.transitions, dtype="<f4").reshape(len(self.ids), self.dim)

    def bias_array(self) -> np.ndarray:
        return np.frombuffer(self.biases, dtype="<f4")

    def event_array(self) -> np.ndarray:
        return np.frombuffer(self.events, dtype="<i8")

    def click_session_array(self) -> np.ndarray:
        return np.frombuffer(self.click_sessions, dtype="<i8")

    def click_item_array(self) -> np.ndarray:
        return np.frombuffer(self.click_items, dtype="<i4")

    def click_ts_array(self) -> np.ndarray:
        return np.frombuffer(self.click_ts, dtype="<i8")


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(ItemDelta)


class ItemSync:
    """One member's side of the item sync: its base copy of the items, what it sent and received.

    ``member`` names this member in the group (stable across restarts: a StatefulSet pod name).
    With ``sessions``, the session signals are shared too: each send carries the clicks they
    learned since the last one, and the others' clicks are learned into them (see
    ``SessionSignals.learn_remote``).
    """

    def __init__(self, model: OnlineMF, member: str, sessions: SessionSignals | None = None) -> None:
        self.model = model
        self.member = member
        self.sessions = sessions
        if sessions is not None:
            sessions.share()
        self.sent_clicks = 0
        self.received_clicks = 0
        self.seq = 0  # sequence number of this member's last send
        self.applied: dict[str, tuple[int, int]] = {}  # sender -> (sequence, part) last applied
        self.sent_items = 0
        self.received_items = 0
        self._version = model.model_version  # items changed after this model version are unsent
        dim = model.config.dim
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._transitions = np.zeros((0, dim), dtype=np.float32)
        self._biases = np.zeros(0, dtype=np.float32)
        self._events = np.zeros(0, dtype=np.int64)
        self._based = 0  # rows with a base (the rest start from a new item's values)
        # Rows of forgotten items (model.max_items, item_ttl_s): a new item taking one gets a new
        # item's base, as if its row were new (see _fit).
        self._unbased = np.zeros(0, dtype=np.int64)
        model.item_forget_hooks.append(self._forgotten)
        self._fit()

    def _fit(self) -> None:
        """Give items created since the last call their base: a new item's initial values, the
        same in every member, so that what they learned or received before is a delta. Rows of
        forgotten items that a new item took since are such rows too."""
        if len(self._unbased):
            taken = self._unbased[~np.isin(self._unbased, self.model.items.ids.free)]
            if len(taken):
                self._unbased = np.setdiff1d(self._unbased, taken)
                self._vectors[taken] = self.model.items.initial_vectors(taken)
                self._transitions[taken] = 0
                self._biases[taken] = 0
                self._events[taken] = 0
        n = len(self.model.items)
        if n <= self._based:
            return
        if n > len(self._biases):
            capacity = max(n, 2 * len(self._biases), 1024)
            for name in ("_vectors", "_transitions", "_biases", "_events"):
                old = getattr(self, name)
                grown = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
                grown[: len(old)] = old
                setattr(self, name, grown)
        new = np.arange(self._based, n, dtype=np.int64)
        self._vectors[new] = self.model.items.initial_vectors(new)
        self._transitions[new] = 0
        self._biases[new] = 0
        self._events[new] = 0
        self._based = n

    def reset_rows(self, rows: np.ndarray) -> None:
        """Rows whose item was forgotten or replaced: their base becomes the row's current values
        (a new item's), so the reset itself is not sent as a change."""
        self._fit()
        model = self.model
        self._vectors[rows] = model.items.vectors[rows]
        self._transitions[rows] = model.item_transitions(rows)
        self._biases[rows] = model.items.biases[rows]
        self._events[rows] = model.interaction_counts(rows)

    def _forgotten(self, rows: np.ndarray) -> None:
        """``OnlineMF.forget_items`` hook: the rows hold nothing now, nor does their base (the
        forgetting is not a change to send: the other members keep or forget the item by their
        own events); a new item taking one later gets a new item's base."""
        self.reset_rows(rows)
        self._unbased = np.union1d(self._unbased, rows)

    def take(self, per_message: int | None = None, items: bool = True) -> list[ItemDelta]:
        """This member's changes since its last send, as the messages to send (none if nothing
        changed); its base then counts them as sent. ``items=False``: the session clicks alone
        (they go out more often than the items: see ``sync.clicks_interval_s``)."""
        self._fit()
        model = self.model
        per_message = per_message or items_per_message(model.config.dim)
        rows, vectors, transitions, biases, events = self._changed() if items else self._unchanged()
        clicks = self.sessions.take_clicks() if self.sessions is not None else (np.zeros(0, np.int64),) * 3
        if not len(rows) and not len(clicks[0]):
            return []
        self._vectors[rows] += vectors
        self._transitions[rows] += transitions
        self._biases[rows] += biases
        self._events[rows] += events
        self.seq += 1
        self.sent_items += len(rows)
        self.sent_clicks += len(clicks[0])
        ids = model.items.ids.ids_of(rows.tolist())
        starts = range(0, len(rows), per_message)
        click_starts = range(0, len(clicks[0]), CLICKS_PER_MESSAGE)
        parts = len(starts) + len(click_starts)
        dim, none = model.config.dim, b""
        messages = [ItemDelta(self.member, self.seq, part, parts, dim, ids[s:s + per_message],
                              vectors[s:s + per_message].astype("<f4").tobytes(),
                              transitions[s:s + per_message].astype("<f4").tobytes(),
                              biases[s:s + per_message].astype("<f4").tobytes(),
                              events[s:s + per_message].astype("<i8").tobytes())
                    for part, s in enumerate(starts)]
        for part, s in enumerate(click_starts, start=len(starts)):
            serials, item_rows, ts = (column[s:s + CLICKS_PER_MESSAGE] for column in clicks)
            distinct, at = np.unique(item_rows, return_inverse=True)
            messages.append(ItemDelta(self.member, self.seq, part, parts, dim, [], none, none, none, none,
                                      model.items.ids.ids_of(distinct.tolist()), serials.astype("<i8").tobytes(),
                                      at.astype("<i4").tobytes(), ts.astype("<i8").tobytes()))
        return messages

    def _changed(self) -> tuple[np.ndarray, ...]:
        """The rows of the items changed since the last send and what changed (value minus base)."""
        model = self.model
        # Whatever moves an item (its vector, bias, count, or its transition vector as a user's
        # previous item) marks it changed: only those are compared with their base.
        rows = model.items_changed_since(self._version)
        self._version = model.model_version
        vectors = model.items.vectors[rows] - self._vectors[rows]
        transitions = model.item_transitions(rows) - self._transitions[rows]
        biases = model.items.biases[rows] - self._biases[rows]
        events = model.interaction_counts(rows) - self._events[rows]
        changed = (vectors != 0).any(axis=1) | (transitions != 0).any(axis=1) | (biases != 0) | (events != 0)
        return tuple(a[changed] for a in (rows, vectors, transitions, biases, events))

    def _unchanged(self) -> tuple[np.ndarray, ...]:
        dim = self.model.config.dim
        return (np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32),
                np.zeros(0, np.float32), np.zeros(0, np.int64))

    def apply(self, delta: ItemDelta) -> int:
        """Apply another member's delta (once per sender and sequence); returns the items it moved.

        Our own messages are skipped, except those sent after the checkpoint we were restored
        from (sequence above ours): the group has them, so our base counts them as sent.
        """
        if delta.dim != self.model.config.dim:
            raise InvalidDelta(f"dimension {delta.dim}, this member's model.dim is {self.model.config.dim}")
        if delta.member == self.member:
            if delta.seq <= self.seq:
                return 0
            rows = self._rows(delta.ids)
            self._add_base(rows, delta)
            if self.sessions is not None:
                self.sessions.count_as_sent(len(delta.click_sessions) // 8)
            if delta.part == delta.parts - 1:
                self.seq = delta.seq
            return 0
        if (delta.seq, delta.part) <= self.applied.get(delta.member, (0, 0)):
            return 0  # a copy sent again by a member that restarted before its checkpoint
        rows = self._rows(delta.ids)
        self.model.add_item_deltas(rows, delta.vector_array(), delta.transition_array(), delta.bias_array(),
                                   delta.event_array())
        self._add_base(rows, delta)
        if delta.click_ids and self.sessions is not None:
            item_rows = self.model.items.rows(delta.click_ids)[delta.click_item_array()]
            self._fit()
            self.sessions.learn_remote(SessionSignals.remote_keys(delta.member, delta.click_session_array()),
                                       item_rows, delta.click_ts_array())
            self.received_clicks += len(item_rows)
        self.applied[delta.member] = (delta.seq, delta.part)
        self.received_items += len(rows)
        return len(rows)

    def _rows(self, ids: list[str]) -> np.ndarray:
        rows = self.model.items.rows(ids)
        self._fit()
        return rows

    def _add_base(self, rows: np.ndarray, delta: ItemDelta) -> None:
        # np.add.at: an id twice in one message (never sent so, but possible on the wire) adds twice.
        np.add.at(self._vectors, rows, delta.vector_array())
        np.add.at(self._transitions, rows, delta.transition_array())
        np.add.at(self._biases, rows, delta.bias_array())
        np.add.at(self._events, rows, delta.event_array())
        # The base follows the model's clipping, or a clipped item would be sent as changed. Only
        # the message's rows moved (the rest are within bounds already): clipping the whole base
        # cost O(items) per message, ~15 ms per message at 200k items.
        self._vectors[rows] = np.clip(self._vectors[rows], -MAX_COMPONENT, MAX_COMPONENT)
        self._transitions[rows] = np.clip(self._transitions[rows], -MAX_COMPONENT, MAX_COMPONENT)
        self._biases[rows] = np.clip(self._biases[rows], -MAX_SCALAR, MAX_SCALAR)

    # -- snapshots for members that join late (stream/item_snapshot.py) -------------------------

    def snapshot(self, per_message: int | None = None) -> tuple[list[ItemDelta], dict[str, tuple[int, int]]]:
        """The group's items as this member has them from the sync topic (its base: every item's
        initial values plus every delta sent, its own included), as absolute values in messages
        of at most ``per_message`` items, and the (sequence, part) of each member's deltas they
        include. Its own unsent learning is left out: it is sent later, as a delta."""
        self._fit()
        model = self.model
        per_message = per_message or items_per_message(model.config.dim)
        held = np.ones(self._based, dtype=bool)
        held[self._unbased[self._unbased < self._based]] = False
        held[model.items.ids.free[model.items.ids.free < self._based]] = False
        rows = np.flatnonzero(held)
        ids = model.items.ids.ids_of(rows.tolist())
        starts = range(0, len(rows), per_message)
        chunks = [ItemDelta(self.member, self.seq, part, len(starts), model.config.dim, ids[s:s + per_message],
                            self._vectors[rows[s:s + per_message]].astype("<f4").tobytes(),
                            self._transitions[rows[s:s + per_message]].astype("<f4").tobytes(),
                            self._biases[rows[s:s + per_message]].astype("<f4").tobytes(),
                            self._events[rows[s:s + per_message]].astype("<i8").tobytes())
                  for part, s in enumerate(starts)]
        included = {**self.applied, self.member: (self.seq, _ALL_PARTS)}
        return chunks, included

    def restore_snapshot(self, chunks: list[ItemDelta], included: dict[str, tuple[int, int]]) -> int:
        """Start from another member's :meth:`snapshot`: each item's base becomes the snapshot's
        value and the model moves by the same amount (what this member learned itself stays on
        top, unsent); the deltas the snapshot includes are not applied again. Returns the items."""
        moved = 0
        for chunk in chunks:
            if chunk.dim != self.model.config.dim:
                raise InvalidDelta(f"dimension {chunk.dim}, this member's model.dim is {self.model.config.dim}")
            rows = self._rows(chunk.ids)
            values = (chunk.vector_array(), chunk.transition_array(), chunk.bias_array(), chunk.event_array())
            bases = (self._vectors, self._transitions, self._biases, self._events)
            self.model.add_item_deltas(rows, *(value - base[rows] for value, base in zip(values, bases)))
            for value, base in zip(values, bases):
                base[rows] = value
            moved += len(rows)
        for member, (seq, part) in included.items():
            if member != self.member and (seq, part) > self.applied.get(member, (0, 0)):
                self.applied[member] = (seq, part)
        return moved

    # -- checkpoints ---------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        n = self._based
        return {"vectors": self._vectors[:n].copy(), "transitions": self._transitions[:n].copy(),
                "biases": self._biases[:n].copy(), "events": self._events[:n].copy(),
                "version": np.array([self._version, self.seq], dtype=np.int64), "unbased": self._unbased.copy()}

    def to_meta(self) -> dict:
        return {"member": self.member, "applied": {k: list(v) for k, v in self.applied.items()}}

    def load(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Restore :meth:`to_arrays` and :meth:`to_meta` output (the model restored first)."""
        n = len(arrays["biases"])
        self._based = 0
        self._unbased = np.zeros(0, dtype=np.int64)
        for name in ("_vectors", "_transitions", "_biases", "_events"):
            setattr(self, name, getattr(self, name)[:0])
        self._fit()  # room for every item, new ones at their initial values
        self._vectors[:n] = arrays["vectors"]
        self._transitions[:n] = arrays["transitions"]
        self._biases[:n] = arrays["biases"]
        self._events[:n] = arrays["events"]
        self._version, self.seq = (int(x) for x in arrays["version"])
        self._unbased = np.asarray(arrays.get("unbased", np.zeros(0)), dtype=np.int64)  # (older: none)
        self.applied = {str(k): (int(v[0]), int(v[1])) for k, v in meta.get("applied", {}).items()}
