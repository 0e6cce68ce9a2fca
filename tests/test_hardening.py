"""Inputs and faults a production topic sees sooner or later: none may stop the service or poison the model."""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from hypothesis import given, settings
from hypothesis import strategies as st
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.stream.broker import create_topics
from recstream.stream.checkpoint import CheckpointStore
from recstream.stream.config import ConfigError, EventsConfig, load_config
from recstream.stream.events import EventDecoder
from recstream.stream.metadata import parse_item_metadata
from recstream.stream.replay import replay_topic
from recstream.stream.service import DLQ_REASON_HEADER
from recstream.stream.state import RecState

from conftest import (
    FAST_GROUP,
    cli_run_args,
    committed_offsets,
    event,
    produce,
    read_all,
    running,
    service_config,
    wait_for,
)


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
                 and service.stats.item_metadata == 1 and service.stats.commits > 0 and not service.offsets,
                 timeout_s=60, what="good events applied and committed, three dead letters")
    letters = {m.key(): m for m in read_all(kafka_bootstrap, topics["dlq"], expect=3)}
    reasons = {k: dict(m.headers())[DLQ_REASON_HEADER].decode() for k, m in letters.items()}
    assert reasons[b"deep"] == "nested too deeply to decode"
    assert letters[b"deep"].value() == deep_event
    assert reasons[b"deep-item"].startswith("bad item metadata: features.genres")
    assert "exceeds max_message_bytes" in reasons[b"huge"]
    assert dict(letters[b"huge"].headers())["recstream.truncated_from"] == str(len(huge)).encode()
    assert huge.startswith(letters[b"huge"].value()) and len(letters[b"huge"].value()) <= 50_000


# -- numbers that poison the model ----------------------------------------------------------------

def _ratings_stream(n: int, scale: float, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    users = [f"u{k}" for k in rng.integers(0, 50, n)]
    items = [f"i{k}" for k in rng.integers(0, 80, n)]
    return users, items, (rng.integers(0, 11, n) * scale / 10).astype(np.float32)


def _all_finite(model: OnlineMF) -> bool:
    return all(np.isfinite(a).all() for a in model.state_arrays().values() if a.dtype.kind == "f")


@pytest.mark.parametrize("scale", [10.0, 100.0])
def test_a_rating_stream_on_a_0_to_100_scale_stays_finite_with_default_settings(scale):
    users, items, ratings = _ratings_stream(5000, scale)
    model = OnlineMF(MFConfig(dim=16))
    for s in range(0, 5000, 500):
        model.learn(users[s:s + 500], items[s:s + 500], ratings[s:s + 500])
    assert _all_finite(model)
    assert np.isfinite(model.predict_rating("u1", "i1"))


def test_a_rating_unit_learns_another_scale_as_well_as_stars():
    users, items, ratings = _ratings_stream(3000, 5.0)
    stars, percent = OnlineMF(MFConfig(dim=8)), OnlineMF(MFConfig(dim=8, rating_unit=20.0))
    stars.learn(users, items, ratings)
    percent.learn(users, items, ratings * 20)
    assert percent.predict_rating("u3", "i7") == pytest.approx(20 * stars.predict_rating("u3", "i7"), rel=1e-4)


def test_ratings_outside_the_configured_range_are_bad_events():
    decoder = EventDecoder(load_config(overrides={"events.rating_min": 0, "events.rating_max": 5}).events)
    batch, bad = decoder.decode([orjson.dumps({"user_id": 1, "item_id": 2, "rating": r}) for r in (0, 5, 5.5, -1)])
    assert batch.ratings.tolist() == [0.0, 5.0]
    assert [n for n, _ in bad] == [2, 3] and "outside [0, 5] (events.rating_min, rating_max)" in bad[0][1]
    with pytest.raises(ConfigError, match="events.rating_max: must be above events.rating_min"):
        load_config(overrides={"events.rating_min": 5, "events.rating_max": 5})


def test_non_finite_state_is_reset_with_an_error_not_spread(caplog):
    model = OnlineMF(MFConfig(dim=8))
    model.learn(["a", "b"], ["x", "y"])
    Q, _ = model.items.storage
    Q[model.items.ids.get("x"), 0] = np.nan  # as if something had slipped past the kernel's bounds
    model.learn(["a", "c"], ["x", "x"], ratings=np.array([4.0, 3.0], dtype=np.float32))
    assert _all_finite(model) and model.non_finite_resets >= 1
    assert "non-finite state after a batch" in caplog.text


def test_a_checkpoint_of_non_finite_state_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="model.items.vectors holds NaN or inf"):
        store.save({"model.items.vectors": np.array([[1.0, np.inf]], dtype=np.float32)}, {})
    assert not list(tmp_path.iterdir())


_accepted_rating = st.one_of(st.none(), st.sampled_from([-1e9, 1e9, 0.0, 1e-30, -1e-30, 3.5]),
                             st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False))


@settings(max_examples=40, deadline=None)
@given(events=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 8), _accepted_rating,
                                  st.sampled_from(["view", "click", "huge"]),
                                  st.one_of(st.none(), st.sampled_from([0, 1, 2**62 - 1]), st.integers(0, 2**62 - 1))),
                       min_size=1, max_size=400),
       learning_rate=st.sampled_from([0.08, 1.0, 9.99]), batch=st.integers(1, 400))
def test_random_streams_of_extreme_accepted_values_leave_every_exported_array_finite(events, learning_rate, batch):
    config = load_config(overrides={"events.rating_min": -1e9, "events.rating_max": 1e9, "model.dim": 8,
                                    "events.weights": {"view": 1e-30, "click": 1.0, "huge": 1e30},
                                    "model.learning_rate": learning_rate, "model.new_item_learning_rate": learning_rate,
                                    "model.transition_learning_rate": learning_rate})
    decoder, state = EventDecoder(config.events), RecState(config.model)
    values = [orjson.dumps({"user_id": u, "item_id": i, "event_type": t,
                            **({} if r is None else {"rating": r}), **({} if ts is None else {"ts": ts})})
              for u, i, r, t, ts in events]
    for s in range(0, len(values), batch):
        decoded, bad = decoder.decode(values[s:s + batch])
        assert not bad
        _, _, losses = state.apply(decoded)
        assert np.isfinite(losses).all()
    arrays, _ = state.snapshot()
    assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")
    rows = np.arange(len(state.model.users))
    assert np.isfinite(state.model.query_vectors(rows, 2**62)).all()
    assert state.model.non_finite_resets == 0  # the kernel's bounds held: the guard had nothing to do


# -- clocks ----------------------------------------------------------------------------------------

@pytest.mark.kafka
def test_one_event_from_the_far_future_moves_neither_now_nor_its_user_into_the_future(kafka_bootstrap, topics):
    start = int(time.time() * 1000)
    produce(kafka_bootstrap, topics["input"], [event(f"u{n % 5}", f"i{n % 9}") for n in range(40)]
            + [event("u1", "i3", ts=2**62 - 1)] + [event(f"u{n % 5}", f"i{n % 9}") for n in range(40)])
    config = service_config(kafka_bootstrap, topics, **{"events.clock_tolerance_s": 60})
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 81 and not service.offsets, what="all applied")
        assert service.stats.clock_ahead == 1
        assert start <= service.stats.last_event_ts <= int(time.time() * 1000) + 60_000
        model = service.model
        row = model.users.ids.get("u1")
        assert start <= int(model._short_ts[row]) <= int(time.time() * 1000)  # the record's time, not 2^62
        # Short-term interest of everyone is still there to rank with at "now".
        rows = np.arange(len(model.users))
        faded = model.query_vectors(rows, service.stats.last_event_ts) - model.users.vectors[rows]
        assert np.abs(faded).sum(axis=1).min() > 0


@pytest.mark.kafka
def test_replay_from_the_topic_equals_consumption_for_events_without_ts(kafka_bootstrap, topics, tmp_path):
    single = dict(topics, input=topics["input"] + "-1p")
    create_topics(kafka_bootstrap, {single["input"]: 1})
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    base = int(time.time() * 1000) - 3_600_000
    for n in range(3000):  # record times a minute apart; a third of the events carry their own time
        body = {"user_id": f"u{n % 40}", "item_id": f"i{(n * 7) % 60}"}
        if n % 3 == 0:
            body["ts"] = base + n * 60_000 - 5_000
        producer.produce(single["input"], key=body["user_id"].encode(), value=orjson.dumps(body),
                         timestamp=base + n * 60_000)
    assert producer.flush(30) == 0
    config = service_config(kafka_bootstrap, single, **{"model.dim": 8, "model.seed": 3})
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 3000, what="all consumed")
        with service.model_lock:
            live_items, live_users = service.model.items.vectors.copy(), service.model.users.vectors.copy()
            live_transitions = service.model._transition[: len(service.model.items)].copy()
    replayed = RecState(config.model)
    replay_topic(replayed, EventDecoder(config.events), {"bootstrap.servers": kafka_bootstrap, **FAST_GROUP},
                 single["input"])
    np.testing.assert_array_equal(replayed.model.items.vectors, live_items)
    np.testing.assert_array_equal(replayed.model.users.vectors, live_users)
    np.testing.assert_array_equal(replayed.model._transition[: len(replayed.model.items)], live_transitions)


# -- state dir, commits ------------------------------------------------------------------------------

def test_checkpoints_are_private_to_the_service_user(tmp_path):
    store = CheckpointStore(tmp_path / "state" / "checkpoints")
    meta = store.save({"model.users.vectors": np.zeros((2, 2), dtype=np.float32)}, {})
    store.record_commit({"clicks/0": 5})
    assert (tmp_path / "state" / "checkpoints").stat().st_mode & 0o777 == 0o700
    for path in (meta, meta.with_suffix(".npz"), tmp_path / "state" / "checkpoints" / "commits.json"):
        assert path.stat().st_mode & 0o777 == 0o600, path


@pytest.mark.kafka
def test_a_second_process_on_the_same_state_dir_refuses_with_a_message(kafka_bootstrap, topics, tmp_path):
    state_dir = tmp_path / "state"
    args = cli_run_args(kafka_bootstrap, topics, "g-lock", "--state-dir", str(state_dir))
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (state_dir / "lock").exists() and (state_dir / "lock").read_text().strip() == str(first.pid),
                 what="the first process to lock the state dir")
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == (
            f"recstream: state dir {state_dir} is in use by another recstream process (pid {first.pid}); "
            "stop it, or give this one another --state-dir")
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0


@pytest.mark.kafka
def test_an_unwritable_commit_record_does_not_stop_the_service(kafka_bootstrap, topics, tmp_path, caplog):
    state_dir = tmp_path / "state"
    (state_dir / "checkpoints" / "commits.json").mkdir(parents=True)  # replacing it fails: IsADirectoryError
    produce(kafka_bootstrap, topics["input"], [event(f"u{n}", f"i{n % 5}") for n in range(90)])
    config = service_config(kafka_bootstrap, topics, **{"state_dir": str(state_dir), "checkpoint.interval_s": 0.5})
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 90 and service.stats.commits > 0 and not service.offsets,
                 what="applied, checkpointed and committed")
    assert sum(committed_offsets(kafka_bootstrap, config.topics.group_id, topics["input"], 3).values()) == 90
    assert "committed, but could not record it" in caplog.text


@pytest.mark.kafka
def test_offsets_not_committed_while_the_broker_was_away_are_committed_on_an_idle_stream(kafka_bootstrap, kafka_proxy,
                                                                                        topics, tmp_path, caplog):
    """The consumer reaches the broker through a proxy, cut before the first checkpoint is due: the
    group loses the partitions (or the commit fails). No event follows, so nothing but a commit of
    what the checkpoint covers, made once the broker is back, can commit those offsets."""
    config = service_config(kafka_bootstrap, topics, **{
        "kafka.consumer.bootstrap.servers": kafka_proxy.bootstrap_servers, "state_dir": str(tmp_path / "state"),
        "output.publish": False, "checkpoint.interval_s": 8})
    produce(kafka_bootstrap, topics["input"], [event(f"u{n}", f"i{n % 5}") for n in range(60)])
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 60, what="all applied")
        assert service.stats.commits == 0, "the checkpoint came before the cut: raise checkpoint.interval_s"
        kafka_proxy.stop()
        wait_for(lambda: "lost" in caplog.text or "commit failed" in caplog.text, timeout_s=60,
                 what="a lost group or a failed commit")
        kafka_proxy.start()
        wait_for(lambda: sum(committed_offsets(kafka_bootstrap, config.topics.group_id, topics["input"], 3).values())
                 == 60, timeout_s=60, what="the offsets committed once the broker is back")


# -- start-up and shutdown ---------------------------------------------------------------------------

def test_an_unreachable_cluster_at_start_is_retried_then_one_clear_line(tmp_path):
    from recstream.stream.broker import free_port

    topics = {"input": "clicks", "output": "recs", "dlq": "clicks.dlq"}
    args = cli_run_args(f"127.0.0.1:{free_port()}", topics, "g", "--set", "loop.startup_timeout_s=3")
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("%")]  # (librdkafka's own lines)
    assert "unreachable" in lines[0] and "retrying in" in lines[0]
    assert lines[-1].startswith("recstream: cannot reach the Kafka cluster at 127.0.0.1:") and "within 3 s" in lines[-1]


@pytest.mark.kafka
def test_sigterm_during_an_index_build_kills_the_build_and_exits(kafka_bootstrap, topics, tmp_path):
    """The build is made slow (40,000 items, 1,000 trees) and starts only once all items are there;
    SIGTERM then must kill it rather than wait for it."""
    produce(kafka_bootstrap, topics["input"], [event(f"u{n % 500}", f"i{n}") for n in range(40_000)])
    state_dir = tmp_path / "state"
    log_path = tmp_path / "run.log"
    args = cli_run_args(kafka_bootstrap, topics, "g-build", "--state-dir", str(state_dir), "--set", "index.n_trees=1000",
                        "--set", "index.min_items=40000", "--set", "model.dim=16")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=log)
    try:
        wait_for(lambda: list((state_dir / "index").glob("*.building")), timeout_s=120, what="the build to start")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = log_path.read_text()
    assert "index build cancelled" in text and "index v1:" not in text  # killed, not waited for
    assert not list((state_dir / "index").glob("items-v*"))


# -- topics ------------------------------------------------------------------------------------------

@pytest.mark.kafka
def test_an_input_topic_deleted_and_created_again_is_read_from_its_start_and_committed(kafka_bootstrap, topics,
                                                                                      tmp_path, caplog):
    config = service_config(kafka_bootstrap, topics, **{"state_dir": str(tmp_path / "state"),
                                                        "checkpoint.interval_s": 0.3})
    produce(kafka_bootstrap, topics["input"], [event(f"u{n}", f"i{n % 5}") for n in range(90)])
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 90 and not service.offsets, what="the old topic done")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.delete_topics([topics["input"]])[topics["input"]].result()
    wait_for(lambda: topics["input"] not in admin.list_topics(timeout=10).topics, what="the topic gone")
    create_topics(kafka_bootstrap, {topics["input"]: 3})
    produce(kafka_bootstrap, topics["input"], [event(f"v{n}", f"i{n % 5}") for n in range(30)])
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 30 and service.stats.commits > 0 and not service.offsets,
                 what="the new topic's events applied and committed")
        assert service.model.events_applied == 120
    assert "was deleted and created again" in caplog.text
    assert sum(committed_offsets(kafka_bootstrap, config.topics.group_id, topics["input"], 3).values()) == 30
