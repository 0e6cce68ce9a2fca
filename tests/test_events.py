"""Decoding input messages: every kind of bad input is named, good ones pass through."""

import numpy as np
import orjson
import pytest
from recstream.stream.config import EventsConfig
from recstream.stream.events import EventDecoder

DECODER = EventDecoder(EventsConfig(max_message_bytes=1000, max_id_length=20))


def test_valid_events_become_arrays():
    values = [
        orjson.dumps({"user_id": "alice", "item_id": 42, "event_type": "purchase", "ts": 1000, "extra": [1]}),
        orjson.dumps({"user_id": 7, "item_id": "x", "rating": 4.5}),
        orjson.dumps({"user_id": "bob", "item_id": "y", "event_type": "view", "rating": 3}),
    ]
    batch, bad = DECODER.decode(values)
    assert bad == []
    assert batch.user_ids == ["alice", "7", "bob"] and batch.item_ids == ["42", "x", "y"]
    assert batch.weights.tolist() == [3.0, 1.0, 0.5]
    assert str(batch.ratings[0]) == "nan" and batch.ratings[1:].tolist() == [4.5, 3.0]
    assert batch.timestamps.tolist() == [1000, -1, -1]
    assert batch.positions == [0, 1, 2]


def test_an_event_with_a_rating_is_explicit_whatever_its_type():
    # MovieLens-shaped events: "rating" is no configured event type, and need not be.
    batch, bad = DECODER.decode([orjson.dumps({"user_id": "u", "item_id": "m", "event_type": "rating", "rating": 4})])
    assert bad == [] and batch.ratings.tolist() == [4.0] and batch.item_ids == ["m"]


@pytest.mark.parametrize("value, reason", [
    (None, "empty message"),
    (b"\xff\xfe not json", "invalid JSON"),
    (b'{"user_id": "a", "item_id": ', "invalid JSON"),
    (b"NaN", "invalid JSON"),
    (b'{"user_id": "a", "item_id": "b", "rating": NaN}', "invalid JSON"),
    (b'{"user_id": "a", "item_id": "b", "rating": 1e999}', "invalid JSON"),
    (b'[1, 2]', "not a JSON object"),
    (b'"text"', "not a JSON object"),
    (b'{"item_id": "b"}', "missing user_id"),
    (b'{"user_id": null, "item_id": "b"}', "missing user_id"),
    (b'{"user_id": "a"}', "missing item_id"),
    (b'{"user_id": "", "item_id": "b"}', "empty user_id"),
    (b'{"user_id": "a", "item_id": "   "}', "empty item_id"),
    (b'{"user_id": true, "item_id": "b"}', "user_id must be a string or an integer, got bool"),
    (b'{"user_id": 1.5, "item_id": "b"}', "user_id must be a string or an integer, got float"),
    (b'{"user_id": {"x": 1}, "item_id": "b"}', "user_id must be a string or an integer, got dict"),
    (b'{"user_id": "aaaaaaaaaaaaaaaaaaaaaaaaa", "item_id": "b"}', "user_id longer than 20"),
    (b'{"user_id": 123456789012345678901234567890, "item_id": "b"}', "user_id longer than 20"),
    (b'{"user_id": "a", "item_id": "b", "event_type": "teleport"}', "unknown event_type 'teleport'"),
    (b'{"user_id": "a", "item_id": "b", "event_type": 3}', "unknown event_type 3"),
    (b'{"user_id": "a", "item_id": "b", "event_type": "rating"}', "unknown event_type 'rating'"),  # no rating
    (b'{"user_id": "a", "item_id": "b", "event_type": 3, "rating": 4}', "unknown event_type 3"),
    (b'{"user_id": "a", "item_id": "b", "event_type": "rating", "rating": "4"}', "rating must be a number"),
    (b'{"user_id": "a", "item_id": "b", "rating": "5"}', "rating must be a number"),
    (b'{"user_id": "a", "item_id": "b", "rating": true}', "rating must be a number"),
    (b'{"user_id": "a", "item_id": "b", "rating": 1e300}', "outside"),
    (b'{"user_id": "a", "item_id": "b", "ts": "yesterday"}', "ts must be"),
    (b'{"user_id": "a", "item_id": "b", "ts": -5}', "ts must be"),
    (b'{"user_id": "a", "item_id": "b", "ts": 1.5}', "ts must be"),
    (b'{"user_id": "a", "item_id": "' + b"x" * 2000 + b'"}', "exceeds max_message_bytes=1000"),
])
def test_bad_input_is_rejected_with_its_reason(value, reason):
    good = orjson.dumps({"user_id": "ok", "item_id": "ok"})
    batch, bad = DECODER.decode([good, value, good])
    assert len(batch) == 2 and batch.positions == [0, 2]
    assert len(bad) == 1 and bad[0][0] == 1
    assert reason in bad[0][1], bad[0][1]


def test_a_batch_of_ordinary_messages_decodes_in_bulk_exactly_as_one_by_one():
    decoder = EventDecoder(EventsConfig())
    values = [b'{"user_id": "u1", "item_id": 7, "rating": 4.5, "ts": 1700000000000}',
              b'{"user_id": 1}',  # missing item_id
              b'{"user_id": "a", "item_id": "b"}{"user_id": "c", "item_id": "d"}',  # two values in one message
              b'{"user_id": "u2", "item_id": "i", "event_type": "nope"}',
              b'{"user_id": "u3", "item_id": "i", "rating": "x"}',
              b'{"user_id": "u4", "item_id": "i9", "event_type": "purchase"}']
    bulk, bulk_bad = decoder.decode(values)
    one_by_one, one_bad = decoder.decode(values + [None])  # a null value: no bulk path for this batch
    assert bulk_bad == one_bad[:-1] and len(bulk_bad) == 4
    assert (bulk.user_ids, bulk.item_ids, bulk.positions) == (one_by_one.user_ids, one_by_one.item_ids,
                                                              one_by_one.positions)
    np.testing.assert_array_equal(bulk.ratings, one_by_one.ratings)
    np.testing.assert_array_equal(bulk.weights, one_by_one.weights)
    np.testing.assert_array_equal(bulk.timestamps, one_by_one.timestamps)
