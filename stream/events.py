"""Decoding a batch of input messages into event arrays, and naming what is wrong with the rest."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import orjson
from recstream.embeddings.table import id_hash
from recstream.stream.config import EventsConfig

# Ratings are learned in float32; a bound far beyond any rating scale keeps every update finite.
MAX_ABS_RATING = 1e6


def session_key(session_id: str) -> int:
    """A session id as the non-zero int64 the session signals keep (0 means "no session id").

    >>> session_key("s1") == session_key("s1") != session_key("s2")
    True
    """
    return (id_hash(session_id) >> 1) or 1


class _Event(msgspec.Struct):
    """The input-event shape, for msgspec's typed decoder (unknown fields are ignored)."""

    user_id: str | int
    item_id: str | int
    event_type: str | None = None
    rating: float | None = None
    ts: int | None = None
    session_id: str | int | None = None


@dataclass
class EventBatch:
    """Valid events of one batch, in input order."""

    user_ids: list[str]
    item_ids: list[str]
    ratings: np.ndarray  # float32, NaN for implicit events
    weights: np.ndarray  # float32
    timestamps: np.ndarray  # int64 epoch ms; -1 where the event had none (caller fills it in)
    positions: list[int]  # index of each event's message in the input sequence
    session_keys: np.ndarray | None = None  # int64 hash of each event's session_id, 0 = none (None: no event had one)

    def __len__(self) -> int:
        return len(self.user_ids)


def _id(event: dict, field: str, max_length: int) -> str:
    value = event.get(field)
    kind = value.__class__
    if kind is str:
        if not value or value.isspace():
            raise ValueError(f"empty {field}")
        if len(value) > max_length:
            raise ValueError(f"{field} longer than {max_length} characters")
        return value
    if kind is int:
        text = str(value)
        if len(text) > max_length:
            raise ValueError(f"{field} longer than {max_length} characters")
        return text
    if value is None:
        raise ValueError(f"missing {field}")
    raise ValueError(f"{field} must be a string or an integer, got {type(value).__name__}")


class EventDecoder:
    """Turns JSON message values into an :class:`EventBatch` plus a reason for each bad one.

    >>> d = EventDecoder(EventsConfig())
    >>> batch, bad = d.decode([b'{"user_id": 1, "item_id": "a", "rating": 4}', b'{"user_id": 1}', b'[]'])
    >>> batch.user_ids, batch.ratings.tolist()
    (['1'], [4.0])
    >>> bad
    [(1, 'missing item_id'), (2, 'not a JSON object')]
    """

    def __init__(self, config: EventsConfig) -> None:
        self.weights = dict(config.weights)
        self.default_event_type = config.default_event_type
        self.max_message_bytes = config.max_message_bytes
        self.max_id_length = config.max_id_length
        self._typed = msgspec.json.Decoder(_Event)

    def decode(self, values: Sequence[bytes | dict | None]) -> tuple[EventBatch, list[tuple[int, str]]]:
        """Valid events of ``values`` (JSON bytes, or dicts already parsed, e.g. from CSV) and the reasons for the rest."""
        users: list[str] = []
        items: list[str] = []
        ratings: list[float] = []
        weights: list[float] = []
        stamps: list[int] = []
        positions: list[int] = []
        sessions: list[int] = []
        any_session = False
        bad: list[tuple[int, str]] = []
        loads = orjson.loads
        weight_of = self.weights.get
        default_type = self.default_event_type
        max_bytes = self.max_message_bytes
        max_id = self.max_id_length
        nan = math.nan
        fast = self._typed.decode
        for n, value in enumerate(values):
            try:
                event = None
                if value.__class__ is bytes and len(value) <= max_bytes:
                    # msgspec parses and type-checks in one C call, about 3x faster than parsing to
                    # a dict and checking each field; anything it rejects takes the path below,
                    # which names the problem.
                    try:
                        typed = fast(value)
                        user, item, event_type = typed.user_id, typed.item_id, typed.event_type
                        rating, ts, session = typed.rating, typed.ts, typed.session_id
                    except msgspec.DecodeError:
                        typed = None
                else:
                    typed = None
                if typed is None:
                    if value.__class__ is dict:
                        event = value
                    else:
                        if value is None:
                            raise ValueError("empty message (null value)")
                        if len(value) > max_bytes:
                            raise ValueError(f"message of {len(value)} bytes exceeds max_message_bytes={max_bytes}")
                        try:
                            event = loads(value)
                        except orjson.JSONDecodeError as exc:
                            raise ValueError(f"invalid JSON: {exc}") from None
                    if event.__class__ is not dict:
                        raise ValueError("not a JSON object")
                    user, item = event.get("user_id"), event.get("item_id")
                    event_type, rating, ts = event.get("event_type"), event.get("rating"), event.get("ts")
                    session = event.get("session_id")
                # Fast checks inline (a call per field per event costs more than the parse);
                # anything unusual goes through _id, which names the problem.
                if user.__class__ is not str or not 0 < len(user) <= max_id or user.isspace():
                    user = _id({"user_id": user}, "user_id", max_id)
                if item.__class__ is not str or not 0 < len(item) <= max_id or item.isspace():
                    item = _id({"item_id": item}, "item_id", max_id)
                if event_type is None:
                    event_type = default_type
                weight = weight_of(event_type) if event_type.__class__ is str else None
                if weight is None:
                    raise ValueError(f"unknown event_type {event_type!r} (configure it in events.weights)")
                if rating is None:
                    rating = nan
                else:
                    if rating.__class__ is int:
                        rating = float(rating)
                    elif rating.__class__ is not float:
                        raise ValueError(f"rating must be a number, got {type(rating).__name__}")
                    if not -MAX_ABS_RATING <= rating <= MAX_ABS_RATING:
                        raise ValueError(f"rating {rating!r} outside [-{MAX_ABS_RATING:g}, {MAX_ABS_RATING:g}]")
                if ts is None:
                    ts = -1
                elif ts.__class__ is not int or ts < 0 or ts >= 2**62:
                    raise ValueError(f"ts must be a non-negative integer epoch in milliseconds, got {ts!r}")
                if session is not None:
                    session = session_key(_id({"session_id": session}, "session_id", max_id))
                    any_session = True
            except (ValueError, OverflowError) as exc:
                bad.append((n, str(exc)))
                continue
            users.append(user)
            items.append(item)
            ratings.append(rating)
            weights.append(weight)
            stamps.append(ts)
            sessions.append(session or 0)
            positions.append(n)
        batch = EventBatch(
            users,
            items,
            np.array(ratings, dtype=np.float32),
            np.array(weights, dtype=np.float32),
            np.array(stamps, dtype=np.int64),
            positions,
            np.array(sessions, dtype=np.int64) if any_session else None,
        )
        return batch, bad
