"""Inputs and faults a production topic sees sooner or later: none may stop the service or poison the model."""

from __future__ import annotations

import orjson
import pytest
from conftest import event, produce, read_all, running, service_config, wait_for
from recstream.stream.broker import create_topics
from recstream.stream.config import EventsConfig
from recstream.stream.events import EventDecoder
from recstream.stream.metadata import parse_item_metadata
from recstream.stream.service import DLQ_REASON_HEADER


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_an_unknown_field_nested_a_thousand_levels_deep_is_a_bad_event_not_a_crash():
    deep = b'{"user_id": "a", "item_id": "b", "extra": ' + _nested(1000) + b"}"
    assert len(deep) < 2100
    batch, bad = EventDecoder(EventsConfig()).decode([b'{"user_id": 1, "item_id": 2}', deep])
    assert len(batch) == 1 and bad == [(1, "nested too deeply to decode")]


@pytest.mark.parametrize("features", [_nested(1000), b'{"g": ' + _nested(1000) + b"}", b'{"g": [{"x": 1}]}'])
def test_item_metadata_with_nested_features_is_rejected_with_its_reason(features):
    with pytest.raises(ValueError, match="features"):
        parse_item_metadata(b'{"item_id": "a", "features": ' + features + b"}")


@pytest.mark.kafka
def test_poison_pills_and_oversized_dead_letters_leave_the_service_running(kafka_bootstrap, topics):
    """A deeply nested event, deeply nested item features, and a dead letter over the producer's
    message.max.bytes: each is a dead letter with its reason, the rest is applied and committed."""
    metadata_topic = topics["input"] + "-items"
    create_topics(kafka_bootstrap, {metadata_topic: 1})
    deep_event = b'{"user_id": "u1", "item_id": "i1", "extra": ' + _nested(1000) + b"}"
    huge = b'{"user_id": "u1", "item_id": "' + b"x" * 200_000 + b'"}'  # over max_message_bytes, and the limit below
    good = [event(f"u{n % 7}", f"i{n % 11}") for n in range(60)]
    produce(kafka_bootstrap, topics["input"], good[:20] + [(b"deep", deep_event)] + good[20:40] + [(b"huge", huge)]
            + good[40:])
    produce(kafka_bootstrap, metadata_topic, [
        (b"deep-item", b'{"item_id": "i1", "features": {"genres": ' + _nested(1000) + b"}}"),
        (b"ok-item", orjson.dumps({"item_id": "i2", "features": {"genres": ["Drama"]}})),
    ])
    config = service_config(kafka_bootstrap, topics, **{"topics.item_metadata": metadata_topic,
                                                        "kafka.producer.message.max.bytes": "100000"})
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 60 and service.stats.dead_letters == 3
                 and service.stats.item_metadata == 1 and service.stats.commits > 0 and not service._uncommitted,
                 timeout_s=60, what="good events applied and committed, three dead letters")
    letters = {m.key(): m for m in read_all(kafka_bootstrap, topics["dlq"], expect=3)}
    reasons = {k: dict(m.headers())[DLQ_REASON_HEADER].decode() for k, m in letters.items()}
    assert reasons[b"deep"] == "nested too deeply to decode"
    assert letters[b"deep"].value() == deep_event
    assert reasons[b"deep-item"].startswith("bad item metadata: features.genres")
    assert "exceeds max_message_bytes" in reasons[b"huge"]
    assert dict(letters[b"huge"].headers())["recstream.truncated_from"] == str(len(huge)).encode()
    assert huge.startswith(letters[b"huge"].value()) and len(letters[b"huge"].value()) <= 50_000
