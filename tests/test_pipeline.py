"""End to end on a real Kafka-protocol broker: events in, recommendation updates out."""

import os
import signal
import subprocess
import sys
import time
import uuid

import orjson
from confluent_kafka.admin import AdminClient
from recstream.stream.service import DLQ_REASON_HEADER
from recstream.stream.synthetic import SyntheticClickstream

from conftest import cli_run_args, committed_offsets, event, produce, read_all, running, service_config, wait_for


def _synthetic_messages(n, seed=0):
    gen = SyntheticClickstream(n_users=300, n_items=200, seed=seed)
    events = gen.events(n)
    return events, events.messages()


def test_events_in_recommendation_updates_out(kafka_bootstrap, topics):
    events, messages = _synthetic_messages(5000)
    produce(kafka_bootstrap, topics["input"], messages)
    config = service_config(kafka_bootstrap, topics, **{"output.top_k": 5})
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == len(messages), what="all events applied")
        wait_for(lambda: service.stats.commits > 0 and not service.offsets, what="a commit of everything")
    updates = read_all(kafka_bootstrap, topics["output"], expect=service.stats.updates_published)
    assert len(updates) == service.stats.updates_published > 0

    last_ts, seen = {}, {}
    for u, i, t in zip(events.user_ids(), events.item_ids(), events.ts.tolist()):
        last_ts[u] = t
        seen.setdefault(u, set()).add(i)
    latest = {}
    for m in updates:
        body = orjson.loads(m.value())
        assert m.key().decode() == body["user_id"]
        assert set(body) == {"user_id", "items", "index_version", "model_version", "generated_at", "last_event_ts"}
        latest[body["user_id"]] = body  # per partition in order; the last update per user is the newest
    assert set(latest) == set(last_ts)  # every user who clicked got an update
    for user, body in latest.items():
        assert body["last_event_ts"] == last_ts[user]
        items = [x["item_id"] for x in body["items"]]
        assert len(items) == 5 and not set(items) & seen[user]  # items already clicked are left out
        scores = [x["score"] for x in body["items"]]
        assert scores == sorted(scores, reverse=True)
        assert body["model_version"] >= 1 and abs(body["generated_at"] / 1000 - time.time()) < 300


def test_bad_messages_go_to_the_dead_letter_topic(kafka_bootstrap, topics):
    bad = [
        (b"k1", b"not json"),
        (b"k2", b'{"user_id": "a"}'),
        (None, None),
        (b"k4", b'{"user_id": "a", "item_id": "b", "rating": "x"}'),
        (b"k5", b'{"user_id": true, "item_id": "b"}'),
        (b"k6", b'{"user_id": "a", "item_id": "b", "event_type": "teleport"}'),
        (b"k7", b"\x00" * 100_000),
    ]
    good = [event(f"user{n}", f"item{n % 7}") for n in range(50)]
    produce(kafka_bootstrap, topics["input"], good[:25] + bad + good[25:])
    config = service_config(kafka_bootstrap, topics)
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 50 and service.stats.dead_letters == len(bad)
                 and service.stats.commits > 0 and not service.offsets, what="all messages handled")
    letters = read_all(kafka_bootstrap, topics["dlq"], expect=len(bad))
    assert len(letters) == len(bad)
    by_key = {m.key(): m for m in letters}
    for key, value in bad:
        letter = by_key[key]
        assert letter.value() == value  # the original bytes, untouched
        headers = dict(letter.headers())
        assert headers[DLQ_REASON_HEADER]
        assert headers["recstream.source"].decode().startswith(topics["input"] + "/")
    reasons = {k: dict(m.headers())[DLQ_REASON_HEADER].decode() for k, m in by_key.items()}
    assert "invalid JSON" in reasons[b"k1"] and reasons[b"k2"] == "missing item_id"
    assert "empty message" in reasons[None] and "rating must be a number" in reasons[b"k4"]
    assert "exceeds max_message_bytes" in reasons[b"k7"]


def _committed(bootstrap, group, topic):
    return committed_offsets(bootstrap, group, topic, 3)


def test_offsets_follow_processing_and_a_restart_resumes_without_loss(kafka_bootstrap, topics):
    first = [event(f"u{n % 40}", f"i{n % 30}") for n in range(2000)]
    produce(kafka_bootstrap, topics["input"], first)
    config = service_config(kafka_bootstrap, topics)
    group = config.topics.group_id
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 2000 and service.stats.commits > 0
                 and not service.offsets, what="first 2000 applied and committed")
    committed = _committed(kafka_bootstrap, group, topics["input"])
    assert sum(committed.values()) == 2000  # committed offsets are exactly what was applied

    second = [event(f"u{n % 40}", f"i{n % 30}") for n in range(700)]
    produce(kafka_bootstrap, topics["input"], second)
    with running(config) as service:  # same group: resumes from the committed offsets
        wait_for(lambda: service.stats.events_applied >= 700 and not service.offsets
                 and service.stats.commits > 0, what="the new events")
        time.sleep(1.0)  # give a wrongly replayed backlog the time to show up
        assert service.stats.events_applied == 700
    assert sum(_committed(kafka_bootstrap, group, topics["input"]).values()) == 2700


def test_cli_run_processes_and_stops_cleanly_on_sigterm(kafka_bootstrap, topics):
    produce(kafka_bootstrap, topics["input"], [event(f"u{n % 10}", f"i{n % 25}") for n in range(500)])
    group = f"cli-{uuid.uuid4().hex[:8]}"
    args = cli_run_args(kafka_bootstrap, topics, group,
                        "--set", "output.flush_interval_s=0.3", "--set", "loop.status_interval_s=0.5")
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        updates = read_all(kafka_bootstrap, topics["output"], expect=10, timeout_s=60)
        assert {m.key() for m in updates} == {f"u{n}".encode() for n in range(10)}
        wait_for(lambda: sum(_committed(kafka_bootstrap, group, topics["input"]).values()) == 500,
                 what="offsets committed")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stderr.read()
    assert "events=500" in log and "SIGTERM: finishing the batch in hand" in log


def test_cli_topics_and_generate_set_up_a_stream(kafka_bootstrap):
    tag = uuid.uuid4().hex[:8]
    cli = [sys.executable, "-m", "recstream.stream.cli"]
    made = subprocess.run(cli + ["topics", "--bootstrap-servers", kafka_bootstrap, "--input-topic", f"c-{tag}",
                                 "--output-topic", f"r-{tag}", "--partitions", "2", "--group-id", f"g-{tag}"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    # A group's topics too: one sync partition every member reads, user state partitioned as the input.
    listed = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert {name: len(listed[name].partitions) for name in (f"c-{tag}", f"g-{tag}.item-deltas", f"g-{tag}.user-state")
            } == {f"c-{tag}": 2, f"g-{tag}.item-deltas": 1, f"g-{tag}.user-state": 2}
    sent = subprocess.run(cli + ["generate", "--bootstrap-servers", kafka_bootstrap, "--topic", f"c-{tag}",
                                 "--events", "1500", "--users", "50", "--items", "20"],
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0 and "produced 1500 events" in sent.stdout, sent.stderr
    messages = read_all(kafka_bootstrap, f"c-{tag}", expect=1500)
    assert len(messages) == 1500
    first = orjson.loads(messages[0].value())
    assert set(first) == {"user_id", "item_id", "event_type", "ts"} and messages[0].key().decode() == first["user_id"]
