"""Decoding a batch of input messages into event arrays, and naming what is wrong with the rest."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress

import msgspec
import numpy as np
import orjson
from recstream.embeddings.ids import CodedIds
from recstream.embeddings.table import id_hashes
from recstream.stream.config import EventsConfig


class _Event(msgspec.Struct, gc=False):
    """The input-event shape, for msgspec's typed decoder (unknown fields are ignored).

    ``gc=False``: a batch makes thousands of them and they hold only strings and numbers, so the
    garbage collector need not track them."""

    user_id: str | int
    item_id: str | int
    event_type: str | None = None
    rating: float | None = None
    ts: int | None = None
    session_id: str | int | None = None


@dataclass
class EventBatch:
    """Valid events of one batch, in input order."""

    user_ids: list[str] | CodedIds  # CodedIds: from a columnar source (Parquet); IdMap.rows takes both
    item_ids: list[str] | CodedIds
    ratings: np.ndarray  # float32, NaN for implicit events
    weights: np.ndarray  # float32
    timestamps: np.ndarray  # int64 epoch ms; -1 where the event had none (caller fills it in)
    positions: list[int]  # index of each event's message in the input sequence
    session_keys: np.ndarray | None = None  # int64 hash of each event's session_id, 0 = none (None: no event had one)

    def __len__(self) -> int:
        return len(self.user_ids)


_FIELDS = ("user_id", "item_id", "event_type", "rating", "ts", "session_id")


def session_keys(session_ids: list[str]) -> np.ndarray:
    """Session ids as the non-zero int64 keys the session signals keep (0 means "no session id").

    >>> keys = session_keys(["s1", "s1", "s2"])
    >>> bool(keys[0] == keys[1] != keys[2]) and bool((keys > 0).all())
    True
    """
    keys = (id_hashes(session_ids) >> np.uint64(1)).astype(np.int64)
    keys[keys == 0] = 1
    return keys


_NONE = type(None)
_ELEMENT = re.compile(r"at `\$\[(\d+)\]")
_BYTE = re.compile(r"\(byte (\d+)\)")


class EventDecoder:
    """Turns JSON message values into an :class:`EventBatch` plus a reason for each bad one.

    Decoding has two steps. Parsing gives each message's five fields (msgspec for JSON, already
    parsed dicts from CSV, columns from Parquet); :meth:`_checked` then checks all the fields of a
    batch at once, column by column, and names what is wrong with each bad event. Every input path
    (live messages, JSON-lines files in bulk, CSV, Parquet) goes through the same checks.

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
        self.rating_min, self.rating_max = config.rating_min, config.rating_max
        self.clock_tolerance_ms = int(config.clock_tolerance_s * 1000)  # for settle_timestamps (stream/clock.py)
        self._typed = msgspec.json.Decoder(_Event)
        # An absent event_type is the default type (its weight, or None when that type is unknown).
        self._weight_of = {**self.weights, None: self.weights.get(self.default_event_type)}

    # -- parsing -----------------------------------------------------------------------------

    def _parse(self, value: bytes | dict | None) -> _Event:
        """The fields of one message, unchecked; raises ValueError naming why it is not an event."""
        if value.__class__ is bytes and len(value) <= self.max_message_bytes:
            # msgspec parses and type-checks in one C call, about 3x faster than parsing to a
            # dict; anything it rejects takes the path below, which names the problem.
            try:
                return self._typed.decode(value)
            except msgspec.DecodeError:
                pass
            except RecursionError:
                # msgspec skips unknown fields recursively: ~1,000 levels of nesting in 2 KB
                # exhaust the stack. Uncaught, it would stop the consumer at this message forever.
                raise ValueError("nested too deeply to decode") from None
        if value.__class__ is dict:
            event = value
        else:
            if value is None:
                raise ValueError("empty message (null value)")
            if len(value) > self.max_message_bytes:
                raise ValueError(f"message of {len(value)} bytes exceeds max_message_bytes={self.max_message_bytes}")
            try:
                event = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON: {exc}") from None
        if event.__class__ is not dict:
            raise ValueError("not a JSON object")
        # A Struct's constructor checks no types: the fields are carried as they are, to be checked.
        return _Event(*(event.get(f) for f in _FIELDS))

    def decode(self, values: Sequence[bytes | dict | None]) -> tuple[EventBatch, list[tuple[int, str]]]:
        """Valid events of ``values`` (JSON bytes, or dicts already parsed, e.g. from CSV) and the reasons for the rest."""
        block = _as_lines(values, self.max_message_bytes)
        if block is not None:  # each value is one ordinary JSON line: parsed in bulk, one event per line
            return self.decode_lines(block)
        events: list[_Event] = []
        positions: list[int] = []
        bad: list[tuple[int, str]] = []
        parse = self._parse
        for n, value in enumerate(values):
            try:
                events.append(parse(value))
                positions.append(n)
            except ValueError as exc:
                bad.append((n, str(exc)))
        return self._checked(_columns(events), positions, bad)

    def decode_lines(self, block: bytes) -> tuple[EventBatch, list[tuple[int, str]]]:
        """``decode`` of the non-blank lines of ``block`` (JSON lines), with runs of ordinary lines
        parsed by one msgspec call each instead of one call per line; the result is the same.

        An ordinary line starts with ``{``, ends with ``}`` (a ``\\r`` may follow) and is no longer
        than ``max_message_bytes``. msgspec takes any whitespace, newlines included, between
        values, so a run parsed at once is accepted only if it gives exactly one value per line:
        a line ending in ``}`` ends a value (a value cut at a ``}`` and continued by a line
        starting with ``{`` is not JSON), so a line holding two values would make the count too
        high. A run that fails is cut at the line msgspec names, which is parsed on its own and so
        gets the reason ``decode`` would give it; every other line goes through ``_parse``.

        >>> d = EventDecoder(EventsConfig())
        >>> batch, bad = d.decode_lines(b'{"user_id": "u", "item_id": 1}\\n\\n{"user_id": "u"}\\n{"user_id": 2, "item_id": "b"}')
        >>> batch.user_ids, batch.item_ids, batch.positions, bad
        (['u', '2'], ['1', 'b'], [0, 2], [(1, 'missing item_id')])
        """
        data = np.frombuffer(block, dtype=np.uint8)
        ends = np.flatnonzero(data == 10)
        if len(data) and data[-1] != 10:
            ends = np.append(ends, len(data))
        starts = np.empty_like(ends)
        starts[:1] = 0
        starts[1:] = ends[:-1] + 1
        # Where a line's last byte is "\r" its "}" is one before (msgspec skips the "\r").
        last = ends - 1 - (data[np.maximum(ends - 1, 0)] == 13)
        ordinary = ((ends - starts >= 2) & (ends - starts <= self.max_message_bytes)
                    & (data[np.minimum(starts, len(data) - 1)] == 123) & (data[np.maximum(last, 0)] == 125))
        events: list[_Event] = []
        positions: list[int] = []
        bad: list[tuple[int, str]] = []
        view = memoryview(block)
        starts_list, ends_list = starts.tolist(), ends.tolist()
        position = 0  # index among the non-blank lines, as in decode(lines)

        def emit_run(a: int, b: int, run_events: list) -> None:
            nonlocal position
            events.extend(run_events)
            positions.extend(range(position, position + b - a))
            position += b - a

        def emit_line(j: int) -> None:
            nonlocal position
            line = block[starts_list[j]:ends_list[j]].strip()
            if not line:
                return  # blank lines are not events
            try:
                events.append(self._parse(line))
                positions.append(position)
            except ValueError as exc:
                bad.append((position, str(exc)))
            position += 1

        def bulk(a: int, b: int) -> tuple[list | None, int | None]:
            """The events of lines a..b-1 parsed at once, or (None, the line that failed if known)."""
            try:
                parsed = self._typed.decode_lines(view[starts_list[a]:ends_list[b - 1]])
            except RecursionError:  # a deeply nested line: each line on its own names it
                return None, None
            except msgspec.DecodeError as exc:
                message = str(exc)
                element, offset = _ELEMENT.search(message), _BYTE.search(message)
                if element:
                    return None, a + int(element.group(1))
                if offset:
                    return None, int(np.searchsorted(ends[a:b], starts_list[a] + int(offset.group(1))) + a)
                return None, None
            return (parsed, None) if len(parsed) == b - a else (None, None)

        def run(a: int, b: int) -> None:
            while a < b:
                parsed, failed = bulk(a, b)
                if parsed is not None:
                    emit_run(a, b, parsed)
                    return
                if failed is None or not a <= failed < b:
                    for j in range(a, b):
                        emit_line(j)
                    return
                if failed > a:
                    parsed, _ = bulk(a, failed)
                    if parsed is not None:
                        emit_run(a, failed, parsed)
                    else:
                        for j in range(a, failed):
                            emit_line(j)
                emit_line(failed)
                a = failed + 1

        previous = 0
        for odd in np.flatnonzero(~ordinary).tolist():
            run(previous, odd)
            emit_line(odd)
            previous = odd + 1
        run(previous, len(ends_list))
        return self._checked(_columns(events), positions, bad)

    def decode_columns(self, columns: tuple[list | CodedIds, list | CodedIds, list | CodedIds, list | np.ndarray,
                                            list | np.ndarray, list]) -> tuple[EventBatch, list[tuple[int, str]]]:
        """Events given as six columns (user_id, item_id, event_type, rating, ts, session_id; None
        where absent), e.g. from Parquet: the same checks as messages get. Ids and types may come as
        :class:`CodedIds` (each distinct value is then checked once), ratings (float64) and times
        (integers) as arrays without missing values."""
        return self._checked(columns, list(range(len(columns[0]))), [])

    # -- checking ----------------------------------------------------------------------------

    def _checked(self, columns: tuple[list, ...], positions: list[int], bad: list[tuple[int, str]]
                 ) -> tuple[EventBatch, list[tuple[int, str]]]:
        """The events whose fields pass every check, and the first failed check of each other one.

        The checks run column by column (a call per event per field would cost more than the
        parse); only the rows that fail one are looked at one by one, to name the problem.
        """
        users, items, event_types, ratings, stamps, sessions = columns
        reasons: dict[int, str] = {}  # row -> the first failed check (fields in order: user, item, type, rating, ts)
        max_id = self.max_id_length
        users = _per_value(lambda values, why: _ids(values, "user_id", max_id, why), users, reasons)
        items = _per_value(lambda values, why: _ids(values, "item_id", max_id, why), items, reasons)
        weights = _per_value(self._weights, event_types, reasons)
        if isinstance(weights, CodedIds):
            weights = np.asarray(weights.values, dtype=np.float32)[weights.codes]
        rating_reasons: dict[int, str] = {}
        rating_values = _ratings(ratings, rating_reasons, self.rating_min, self.rating_max)
        # An event with a rating is explicit feedback whatever its type is called (MovieLens-shaped
        # logs say "rating"): an unknown type does not reject it (its weight is not used), the
        # rating's own check does.
        for row in [r for r, why in reasons.items() if why.startswith(_UNKNOWN_TYPE)]:
            rated = ratings[row] is not None and not (isinstance(ratings, np.ndarray) and np.isnan(ratings[row]))
            if event_types[row].__class__ is str and rated:
                del reasons[row]
                weights[row] = 1.0
        for row, why in rating_reasons.items():
            reasons.setdefault(row, why)
        stamp_values = _stamps(stamps, reasons)
        session_keys = _session_keys(sessions, max_id, reasons)
        if reasons:
            keep = np.ones(len(users), dtype=bool)
            keep[list(reasons)] = False
            kept = keep.tolist()
            users, items = (ids.kept(keep) if isinstance(ids, CodedIds) else list(compress(ids, kept))
                            for ids in (users, items))
            weights, rating_values, stamp_values = weights[keep], rating_values[keep], stamp_values[keep]
            session_keys = None if session_keys is None else session_keys[keep]
            bad = sorted(bad + [(positions[row], reason) for row, reason in reasons.items()])
            positions = list(compress(positions, kept))
        return EventBatch(users, items, rating_values, weights, stamp_values, positions, session_keys), bad

    def _weights(self, event_types: list, reasons: dict[int, str]) -> np.ndarray:
        """Each event's weight (float32) from its type; unknown types are named in ``reasons``."""
        weight_of = self._weight_of
        try:
            weights = list(map(weight_of.get, event_types))
        except TypeError:  # an unhashable value (a list, from a dict) is no known type either
            weights = [weight_of.get(t) if t.__class__ is str or t is None else None for t in event_types]
        if None in weights:
            for row, weight in enumerate(weights):
                if weight is None:
                    kind = event_types[row]
                    kind = self.default_event_type if kind is None else kind
                    reasons.setdefault(row, f"{_UNKNOWN_TYPE} {kind!r} (configure it in events.weights)")
                    weights[row] = 0.0
        return np.array(weights, dtype=np.float32)


_UNKNOWN_TYPE = "unknown event_type"


def _as_lines(values: Sequence[bytes | dict | None], limit: int) -> bytes | None:
    """``values`` joined as JSON lines if every one is an ordinary line for ``decode_lines``
    (bytes of 2 to ``limit`` bytes, starting with ``{`` and ending with ``}``, with no newline), else None."""
    try:
        block = b"\n".join(values)
    except TypeError:  # a null value, or parsed dicts
        return None
    if not values:
        return None
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    data = np.frombuffer(block, dtype=np.uint8)
    ends = np.cumsum(lengths + 1) - 1  # where each value's newline is (or would be, for the last)
    if (lengths.min() < 2 or lengths.max() > limit or np.count_nonzero(data == 10) != len(values) - 1
            or not (data[ends - lengths] == 123).all() or not (data[ends - 1] == 125).all()):
        return None
    return block


def _columns(events: list[_Event]) -> tuple[list, list, list, list, list, list]:
    """The six fields of ``events`` as columns (a comprehension per field: faster than one loop)."""
    return ([e.user_id for e in events], [e.item_id for e in events], [e.event_type for e in events],
            [e.rating for e in events], [e.ts for e in events], [e.session_id for e in events])


def _session_keys(values: list, max_length: int, reasons: dict[int, str]) -> np.ndarray | None:
    """Each event's session key (0: none), or None when no event has a session id; a bad id
    (the rules of user and item ids) is named in ``reasons``."""
    rows = [row for row, value in enumerate(values) if value is not None]
    if not rows:
        return None
    why: dict[int, str] = {}
    ids = _ids([values[row] for row in rows], "session_id", max_length, why)
    for n, reason in why.items():
        reasons.setdefault(rows[n], reason)
    good = [n for n in range(len(rows)) if n not in why]
    keys = np.zeros(len(values), dtype=np.int64)
    keys[[rows[n] for n in good]] = session_keys([ids[n] for n in good])
    return keys


def _per_value(check, column: list | CodedIds, reasons: dict[int, str]) -> list | CodedIds:
    """``check(values, reasons)`` on a column; on :class:`CodedIds` once per distinct value, its
    reasons passed on to every row holding that value."""
    if not isinstance(column, CodedIds):
        return check(column, reasons)
    why: dict[int, str] = {}
    values = check(column.values, why)
    if why:
        bad = np.zeros(len(column.values), dtype=bool)
        bad[list(why)] = True
        codes = column.codes
        for row in np.flatnonzero(bad[codes]).tolist():
            reasons.setdefault(row, why[int(codes[row])])
    return CodedIds(values if isinstance(values, list) else values.tolist(), column.codes)


def _ids(values: list, field: str, max_length: int, reasons: dict[int, str]) -> list[str]:
    """``values`` as id strings (integers become their decimal text); bad ones are named in ``reasons``."""
    try:  # the usual case, all strings: str.isspace raises TypeError on anything else
        if not any(map(str.isspace, values)):
            lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
            if not len(lengths) or (lengths.min() > 0 and lengths.max() <= max_length):
                return values
    except TypeError:
        pass
    kinds = set(map(type, values))
    if kinds <= {str}:
        ids = values
    elif kinds <= {str, int}:
        ids = [v if v.__class__ is str else str(v) for v in values]
    else:
        ids = []
        for row, value in enumerate(values):
            if value.__class__ is str:
                ids.append(value)
            elif value.__class__ is int:
                ids.append(str(value))
            else:
                ids.append("")
                reasons.setdefault(row, f"missing {field}" if value is None
                                   else f"{field} must be a string or an integer, got {type(value).__name__}")
    n = len(ids)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    empty = (lengths == 0) | np.fromiter(map(str.isspace, ids), dtype=bool, count=n)
    for row in np.flatnonzero(empty).tolist():
        reasons.setdefault(row, f"empty {field}")
    for row in np.flatnonzero(lengths > max_length).tolist():
        reasons.setdefault(row, f"{field} longer than {max_length} characters")
    return ids


def _ratings(values: list, reasons: dict[int, str], low: float, high: float) -> np.ndarray:
    """Ratings as float32, NaN for implicit events (None); bad ones, and ones outside [low, high],
    are named in ``reasons``."""
    n = len(values)
    if isinstance(values, np.ndarray):  # numbers, none missing
        ratings, absent = values.astype(np.float64), 0
    else:
        ratings, absent = None, values.count(None)
    if absent == n:
        return np.full(n, np.nan, dtype=np.float32)
    if ratings is None and set(map(type, values)) <= {float, int, _NONE}:
        try:
            ratings = np.array(values, dtype=np.float64)  # None becomes NaN
        except OverflowError:
            pass
    if ratings is None:  # something that is not a number, or an integer too large for a float
        ratings = np.full(n, np.nan)
        for row, value in enumerate(values):
            if value is None:
                continue
            try:
                if value.__class__ is int:
                    value = float(value)
                elif value.__class__ is not float:
                    raise ValueError(f"rating must be a number, got {type(value).__name__}")
            except (ValueError, OverflowError) as exc:
                reasons.setdefault(row, str(exc))
                continue
            ratings[row] = value
    outside = ~((ratings >= low) & (ratings <= high))  # NaN too: a NaN rating (from CSV) is no rating
    if absent:
        outside &= np.fromiter((v is not None for v in values), dtype=bool, count=n)
    ratings[outside] = np.nan  # dropped; NaN keeps the float32 cast quiet
    for row in np.flatnonzero(outside).tolist():
        if row not in reasons:
            reasons[row] = f"rating {float(values[row])!r} outside [{low:g}, {high:g}] (events.rating_min, rating_max)"
    return ratings.astype(np.float32)


def _stamps(values: list, reasons: dict[int, str]) -> np.ndarray:
    """Event times (int64 epoch ms), -1 where absent; bad ones are named in ``reasons``."""
    n = len(values)
    if isinstance(values, np.ndarray):  # integers, none missing
        stamps, absent = values, 0
    else:
        stamps, absent = None, values.count(None)
    if absent == n:
        return np.full(n, -1, dtype=np.int64)
    if stamps is None and set(map(type, values)) <= {int, _NONE}:
        try:
            stamps = np.array([0 if v is None else v for v in values] if absent else values, dtype=np.int64)
        except OverflowError:
            pass
    if stamps is None:
        stamps = np.zeros(n, dtype=np.int64)
        for row, value in enumerate(values):
            if value.__class__ is int and 0 <= value < 2**62:
                stamps[row] = value
            elif value is not None:
                stamps[row] = -1  # marked bad below
    outside = (stamps < 0) | (stamps >= 2**62)
    for row in np.flatnonzero(outside).tolist():
        value = values[row]
        reasons.setdefault(row, f"ts must be a non-negative integer epoch in milliseconds, got "
                                f"{int(value) if isinstance(value, np.integer) else value!r}")
    if stamps.dtype != np.int64:  # e.g. unsigned: the rows that do not fit are rejected above
        stamps = np.where(outside, 0, stamps).astype(np.int64)
    if absent:
        stamps[np.fromiter((v is None for v in values), dtype=bool, count=n)] = -1
    return stamps
