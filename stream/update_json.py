"""The output messages of a publishing round, written as JSON in one compiled call.

A round can hold a hundred thousand users; building a dict per item and calling a JSON encoder
per user costs more than finding the recommendations. Ids are copied from the id maps' UTF-8
blobs (escaped for JSON), scores written with six decimals. The result is one buffer and the
end offset of each message.

>>> import orjson, numpy as np
>>> from recstream.embeddings.ids import IdMap
>>> users, items = IdMap(["u1", 'say "hi"']), IdMap(["i0", "i1", "i2"])
>>> buf, ends = update_values(users, items, np.array([1, 0]), np.array([[2, 0], [1, -1]]),
...                           np.array([[1.5, -0.25], [3.0, -np.inf]], dtype=np.float32),
...                           [17, 18], index_version=4, model_version=9, generated_at=100)
>>> orjson.loads(buf[: ends[0]])["user_id"], orjson.loads(buf[: ends[0]])["items"]
('say "hi"', [{'item_id': 'i2', 'score': 1.5}, {'item_id': 'i0', 'score': -0.25}])
>>> orjson.loads(buf[ends[0]: ends[1]])
{'user_id': 'u1', 'items': [{'item_id': 'i1', 'score': 3.0}], 'index_version': 4, 'model_version': 9, 'generated_at': 100, 'last_event_ts': 18}
"""

from __future__ import annotations

import numpy as np
from numba import njit
from recstream.embeddings.ids import IdMap

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_USER = np.frombuffer(b'{"user_id":"', dtype=np.uint8)
_ITEMS = np.frombuffer(b'","items":[', dtype=np.uint8)
_ITEM = np.frombuffer(b'{"item_id":"', dtype=np.uint8)
_SCORE = np.frombuffer(b'","score":', dtype=np.uint8)
_INDEX = np.frombuffer(b'],"index_version":', dtype=np.uint8)
_MODEL = np.frombuffer(b',"model_version":', dtype=np.uint8)
_GENERATED = np.frombuffer(b',"generated_at":', dtype=np.uint8)
_LAST = np.frombuffer(b',"last_event_ts":', dtype=np.uint8)


@njit(cache=True, inline="always")
def _put(buf, at, text):
    for j in range(len(text)):
        buf[at + j] = text[j]
    return at + len(text)


@njit(cache=True, inline="always")
def _put_id(buf, at, blob, start, end, hexdigits):
    """A JSON string body: quote, backslash and control bytes escaped; UTF-8 copied as is."""
    for j in range(start, end):
        c = blob[j]
        if c == 34 or c == 92:
            buf[at] = 92
            buf[at + 1] = c
            at += 2
        elif c < 32:
            buf[at] = 92
            buf[at + 1] = 117  # \u00XX
            buf[at + 2] = 48
            buf[at + 3] = 48
            buf[at + 4] = hexdigits[c >> 4]
            buf[at + 5] = hexdigits[c & 15]
            at += 6
        else:
            buf[at] = c
            at += 1
    return at


@njit(cache=True, inline="always")
def _put_int(buf, at, value):
    if value < 0:
        buf[at] = 45
        at += 1
        value = -value
    digits = 1
    probe = value
    while probe >= 10:
        probe //= 10
        digits += 1
    for j in range(digits - 1, -1, -1):
        buf[at + j] = 48 + value % 10
        value //= 10
    return at + digits


@njit(cache=True, inline="always")
def _put_score(buf, at, score):
    """``score`` with six decimals, trailing zeros dropped (one kept): ``-0.25``, ``3.0``.

    Scores are inner products of bounded vectors; a magnitude past 1e12 (which would overflow
    the fixed-point form) is written as +-1e12.
    """
    scaled = np.int64(np.round(min(max(np.float64(score), -1e12), 1e12) * 1e6))
    if scaled < 0:
        buf[at] = 45
        at += 1
        scaled = -scaled
    at = _put_int(buf, at, scaled // 1_000_000)
    buf[at] = 46
    at += 1
    fraction = scaled % 1_000_000
    last = at
    for j in range(6):
        digit = (fraction // 10 ** (5 - j)) % 10
        buf[at + j] = 48 + digit
        if digit != 0 or j == 0:
            last = at + j + 1
    return last


@njit(cache=True)
def _write(user_blob, user_ends, item_blob, item_ends, user_rows, item_rows, scores, last_event_ts,
           index_version, model_version, generated_at, hexdigits, user_text, items_text, item_text, score_text,
           index_text, model_text, generated_text, last_text):
    n_users, k = item_rows.shape
    # Worst case: every id byte escaped to six, every number at full width.
    size = 0
    for n in range(n_users):
        u = user_rows[n]
        size += 6 * (user_ends[u] - (user_ends[u - 1] if u > 0 else 0)) + 160
        for j in range(k):
            i = item_rows[n, j]
            if i >= 0:
                size += 6 * (item_ends[i] - (item_ends[i - 1] if i > 0 else 0)) + 60
    buf = np.empty(size, dtype=np.uint8)
    ends = np.empty(n_users, dtype=np.int64)
    at = 0
    for n in range(n_users):
        u = user_rows[n]
        at = _put(buf, at, user_text)
        at = _put_id(buf, at, user_blob, user_ends[u - 1] if u > 0 else 0, user_ends[u], hexdigits)
        at = _put(buf, at, items_text)
        first = True
        for j in range(k):
            i = item_rows[n, j]
            if i < 0:
                continue
            if not first:
                buf[at] = 44
                at += 1
            first = False
            at = _put(buf, at, item_text)
            at = _put_id(buf, at, item_blob, item_ends[i - 1] if i > 0 else 0, item_ends[i], hexdigits)
            at = _put(buf, at, score_text)
            at = _put_score(buf, at, scores[n, j])
            buf[at] = 125
            at += 1
        at = _put(buf, at, index_text)
        at = _put_int(buf, at, index_version)
        at = _put(buf, at, model_text)
        at = _put_int(buf, at, model_version)
        at = _put(buf, at, generated_text)
        at = _put_int(buf, at, generated_at)
        at = _put(buf, at, last_text)
        at = _put_int(buf, at, last_event_ts[n])
        buf[at] = 125
        at += 1
        ends[n] = at
    return buf[:at], ends


def update_values(users: IdMap, items: IdMap, user_rows: np.ndarray, item_rows: np.ndarray, scores: np.ndarray,
                  last_event_ts: list[int], index_version: int, model_version: int, generated_at: int
                  ) -> tuple[bytes, np.ndarray]:
    """All messages' JSON, concatenated, and where each ends (the output contract in the README).

    ``item_rows`` entries of -1 are padding and left out. Scores must be finite.
    """
    user_blob, user_ends, user_at = users.encoded(user_rows)  # (only the round's users once rows were reused)
    item_blob, item_ends = items.to_arrays()
    buf, ends = _write(user_blob, user_ends, item_blob, item_ends, np.ascontiguousarray(user_at, dtype=np.int64),
                       np.ascontiguousarray(item_rows, dtype=np.int64), np.ascontiguousarray(scores, dtype=np.float32),
                       np.asarray(last_event_ts, dtype=np.int64), index_version, model_version, generated_at, _HEX,
                       _USER, _ITEMS, _ITEM, _SCORE, _INDEX, _MODEL, _GENERATED, _LAST)
    return buf.tobytes(), ends
