"""Replay and export: files in every accepted format, through the same update code as live consumption."""

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from conftest import FAST_GROUP, produce, running, service_config, wait_for
from recstream.embeddings.model import MFConfig, epoch_rate_scale
from recstream.stream.broker import create_topics
from recstream.stream.config import EventsConfig
from recstream.stream.events import EventDecoder
from recstream.stream.replay import export_state, replay_file, replay_topic
from recstream.stream.state import RecState
from recstream.stream.synthetic import SyntheticClickstream

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small" / "ratings.csv"
CFG = MFConfig(dim=8, seed=3)


def _messages(n=6000, seed=0):
    return SyntheticClickstream(n_users=200, n_items=150, seed=seed).events(n).messages()


def _direct(values, epochs=1):
    state = RecState(CFG)
    decoder = EventDecoder(EventsConfig())
    for epoch in range(epochs):
        for start in range(0, len(values), 1000):
            batch, bad = decoder.decode(values[start:start + 1000])
            state.apply(batch, rate_scale=epoch_rate_scale(epoch, epochs))
    return state


def _same(a: RecState, b: RecState):
    np.testing.assert_array_equal(a.model.users.vectors, b.model.users.vectors)
    np.testing.assert_array_equal(a.model.items.vectors, b.model.items.vectors)
    np.testing.assert_array_equal(a.model.items.biases, b.model.items.biases)


def test_json_lines_plain_and_gzip_with_epochs(tmp_path):
    values = [v for _, v in _messages()]
    plain, zipped = tmp_path / "log.jsonl", tmp_path / "log.jsonl.gz"
    plain.write_bytes(b"\n".join(values) + b"\n\nnot json\n")
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    expected = _direct(values, epochs=2)
    for path in (plain, zipped):
        state = RecState(CFG)
        result = replay_file(state, EventDecoder(EventsConfig()), path, epochs=2)
        assert result.events_applied == 2 * len(values) and result.rejected == 2
        assert result.rejected_reasons == {"invalid JSON": 2}  # the bad line, once per epoch
        _same(state, expected)


def test_csv_with_a_column_mapping(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\r\n1,10,4.0,964982703\r\n2,10,3.5,964982704\r\n1,11,x,1\r\n")
    state = RecState(CFG)
    columns = {"user_id": "userId", "item_id": "movieId", "rating": "rating", "ts": "timestamp"}
    result = replay_file(state, EventDecoder(EventsConfig()), path, columns=columns, ts_unit="s")
    assert result.events_applied == 2 and result.rejected == 1
    assert list(result.rejected_reasons) == ["rating must be a number, got str"]
    assert state.model.users.ids.ids == ["1", "2"] and state.model.global_mean == pytest.approx(3.75)


@pytest.mark.skipif(not MOVIELENS.exists(), reason="../shared/data is not beside this checkout")
def test_cli_replay_then_export_on_movielens(tmp_path):
    cli = [sys.executable, "-m", "recstream.stream.cli"]
    replay = subprocess.run(cli + ["replay", "--events", str(MOVIELENS), "--ts-unit", "s", "--quiet",
                                   "--columns", "user_id=userId,item_id=movieId,rating=rating,ts=timestamp",
                                   "--state-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stderr
    assert "replayed 100,836 events (0 rejected)" in replay.stdout
    out = tmp_path / "state.npz"
    export = subprocess.run(cli + ["export", "--state-dir", str(tmp_path / "state"), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr
    data = np.load(out, allow_pickle=False)
    assert data["user_ids"].shape == (610,) and data["item_ids"].shape == (9724,)
    assert data["user_vectors"].shape == (610, 32) and data["item_bias"].shape == (9724,)
    assert 3.4 < float(data["global_mean"]) < 3.6 and int(data["events_applied_total"]) == 100_836


def test_replay_of_a_log_equals_consuming_it_from_kafka(kafka_bootstrap, topics, tmp_path):
    messages = _messages(8000)
    # One partition: the consumed order is the file order.
    single = dict(topics, input=topics["input"] + "-1p")
    create_topics(kafka_bootstrap, {single["input"]: 1})
    produce(kafka_bootstrap, single["input"], messages)
    config = service_config(kafka_bootstrap, single, **{"model.dim": 8, "model.seed": 3,
                                                        "state_dir": str(tmp_path / "live")})
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == len(messages), what="all consumed")
    export_state(tmp_path / "live", tmp_path / "live.npz")

    log = tmp_path / "log.jsonl"
    log.write_bytes(b"\n".join(v for _, v in messages))
    replayed = RecState(CFG)
    replay_file(replayed, EventDecoder(EventsConfig()), log)
    live = np.load(tmp_path / "live.npz")
    np.testing.assert_array_equal(live["user_vectors"], replayed.model.users.vectors)
    np.testing.assert_array_equal(live["item_vectors"], replayed.model.items.vectors)
    assert live["partitions"].tolist() == [f"{single['input']}/0"]
    assert live["offsets"].tolist() == [len(messages)] and live["events_applied"].tolist() == [len(messages)]

    # Replaying the topic itself (own group, assign()) gives the same state and its positions.
    from_topic = RecState(CFG)
    result = replay_topic(from_topic, EventDecoder(EventsConfig()),
                          {"bootstrap.servers": kafka_bootstrap, **FAST_GROUP}, single["input"])
    assert result.events_applied == len(messages)
    np.testing.assert_array_equal(from_topic.model.users.vectors, replayed.model.users.vectors)
    assert from_topic.positions == {f"{single['input']}/0": len(messages)}


def test_topic_replay_filters_by_record_timestamp(kafka_bootstrap, topics):
    import time

    from confluent_kafka import Producer

    now = int(time.time() * 1000)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for n in range(30):  # CreateTime 10 s apart, set by the producer
        producer.produce(topics["input"], key=b"k", timestamp=now - 300_000 + n * 10_000,
                         value=orjson.dumps({"user_id": f"u{n}", "item_id": "i"}))
    producer.flush()
    state = RecState(CFG)
    result = replay_topic(state, EventDecoder(EventsConfig()), {"bootstrap.servers": kafka_bootstrap},
                          topics["input"], start=str(now - 200_000), end=str(now - 100_000))
    assert result.events_applied == 10
    assert state.model.users.ids.ids == [f"u{n}" for n in range(10, 20)]


def test_cli_replay_with_item_metadata_gives_cold_items_content_vectors(tmp_path):
    log = tmp_path / "events.jsonl"
    log.write_bytes(b"\n".join(v for _, v in _messages(3000)))
    items = tmp_path / "items.jsonl"
    items.write_bytes(b"\n".join(orjson.dumps({"item_id": f"i{n}", "features": {"genre": f"g{n % 4}"}})
                                 for n in range(150)) + b"\n" +
                      orjson.dumps({"item_id": "unseen", "features": {"genre": "g1"}, "text": "brand new"}))
    result = subprocess.run([sys.executable, "-m", "recstream.stream.cli", "replay", "--events", str(log), "--quiet",
                             "--item-metadata", str(items), "--state-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "content vectors for" in result.stdout
    export_state(tmp_path / "state", tmp_path / "out.npz")
    assert "unseen" in np.load(tmp_path / "out.npz")["item_ids"].tolist()
