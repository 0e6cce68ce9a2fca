"""Replay and export: files in every accepted format, through the same update code as live consumption."""

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from recstream.embeddings.model import MFConfig, epoch_rate_scale
from recstream.stream.broker import create_topics
from recstream.stream.config import ConfigError, EventsConfig
from recstream.stream.events import EventDecoder
from recstream.stream.replay import export_state, read_ahead, read_event_log, replay_file, replay_topic
from recstream.stream.state import RecState
from recstream.stream.synthetic import SyntheticClickstream

from conftest import FAST_GROUP, produce, running, service_config, wait_for

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


# -- bulk JSON lines and Parquet ----------------------------------------------------------------

BAD_LINES = [
    b'{"user_id": "a", "item_id": ', b"not json", b"\xff\xfe", b"[]", b'"text"', b"null",
    b'{"item_id": "b"}', b'{"user_id": null, "item_id": "b"}', b'{"user_id": "a"}', b'{"user_id": "", "item_id": "b"}',
    b'{"user_id": "a", "item_id": "   "}', b'{"user_id": true, "item_id": "b"}', b'{"user_id": 1.5, "item_id": "b"}',
    b'{"user_id": "' + b"x" * 300 + b'", "item_id": "b"}', b'{"user_id": "a", "item_id": "b", "event_type": "teleport"}',
    b'{"user_id": "a", "item_id": "b", "event_type": 3}', b'{"user_id": "a", "item_id": "b", "rating": "5"}',
    b'{"user_id": "a", "item_id": "b", "rating": true}', b'{"user_id": "a", "item_id": "b", "rating": 1e300}',
    b'{"user_id": "a", "item_id": "b", "rating": NaN}', b'{"user_id": "a", "item_id": "b", "ts": -5}',
    b'{"user_id": "a", "item_id": "b", "ts": 1.5}', b'{"user_id": "a", "item_id": "b", "ts": 18446744073709551617}',
    b'{"user_id": "a", "item_id": "' + b"x" * 70_000 + b'"}',
    # Shapes a parser of many lines at once could get wrong: two events on a line, one event on two lines.
    b'{"user_id": "a", "item_id": "b"} {"user_id": "c", "item_id": "d"}',
    b'{"user_id": "a", "item_id": "b"},{"user_id": "c", "item_id": "d"}',
    b'{"user_id": "a",\n"item_id": "b"}', b'{"user_id": "a", "x": {}\n}', b'{"user_id": "a}',
]
ODD_BUT_VALID = [b"", b"   ", b'  {"user_id": "sp", "item_id": "ace"}  ', b'{"user_id": "cr", "item_id": "lf"}\r',
                 b'{"user_id": 7, "item_id": 8, "rating": 4, "ts": null, "event_type": null}']


def _log_with_bad_lines(n=6000, bad_every=37, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for n_line, value in enumerate(v for _, v in _messages(n, seed)):
        if n_line % bad_every == 0:
            lines.append(BAD_LINES[rng.integers(len(BAD_LINES))])
        if n_line % 101 == 0:
            lines.append(ODD_BUT_VALID[rng.integers(len(ODD_BUT_VALID))])
        lines.append(value)
    return b"\n".join(lines) + b"\n"


def _same_batches(a, b):
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids and a.positions == b.positions
    for x, y in ((a.ratings, b.ratings), (a.weights, b.weights), (a.timestamps, b.timestamps)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bulk_json_lines_decoding_equals_the_per_message_decoder(seed):
    block = _log_with_bad_lines(seed=seed)
    decoder = EventDecoder(EventsConfig())
    per_message, reasons = decoder.decode([line.strip() for line in block.split(b"\n") if line.strip()])
    bulk, bulk_reasons = decoder.decode_lines(block)
    assert len(reasons) > 100 and len(per_message) > 5000
    assert bulk_reasons == reasons
    _same_batches(bulk, per_message)


def test_fast_json_replay_gives_the_per_message_state_and_rejections(tmp_path, monkeypatch):
    import recstream.stream.replay as replay

    block = _log_with_bad_lines(seed=3)
    path = tmp_path / "log.jsonl"
    path.write_bytes(block)
    lines = [line.strip() for line in block.split(b"\n") if line.strip()]
    expected, decoder = RecState(CFG), EventDecoder(EventsConfig())
    rejected = 0
    for start in range(0, len(lines), 1000):  # the per-message decoder, another cut into batches
        batch, bad = decoder.decode(lines[start:start + 1000])
        rejected += len(bad)
        expected.apply(batch)
    # Small blocks: lines are cut across block ends, and a line longer than a block is one block.
    monkeypatch.setattr(replay, "BLOCK_BYTES", 4096)
    state = RecState(CFG)
    result = replay_file(state, EventDecoder(EventsConfig()), path)
    assert result.rejected == rejected and result.events_applied == expected.model.events_applied
    _same(state, expected)
    np.testing.assert_array_equal(state.model.users.biases, expected.model.users.biases)
    assert state.model.users.ids.ids == expected.model.users.ids.ids


def _parquet(path, columns: dict):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=2500)
    return path


def test_parquet_and_json_lines_of_the_same_events_give_the_same_state(tmp_path):
    values = [orjson.loads(v) for _, v in _messages(7000)]
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_bytes(b"\n".join(orjson.dumps(v) for v in values))
    parquet = _parquet(tmp_path / "log.parquet", {f: [v[f] for v in values] for f in ("user_id", "item_id",
                                                                                       "event_type", "ts")})
    from_json, from_parquet = RecState(CFG), RecState(CFG)
    a = replay_file(from_json, EventDecoder(EventsConfig()), jsonl, epochs=2)
    b = replay_file(from_parquet, EventDecoder(EventsConfig()), parquet, epochs=2)
    assert a.events_applied == b.events_applied == 2 * len(values) and a.rejected == b.rejected == 0
    _same(from_json, from_parquet)
    assert from_json.model.items.ids.ids == from_parquet.model.items.ids.ids
    assert from_json.history.to_arrays()["items"].tolist() == from_parquet.history.to_arrays()["items"].tolist()


def test_parquet_column_mapping_and_bad_rows_as_in_csv(tmp_path):
    rows = [  # userId, movieId, score, when (s), kind; the bad rows are rejected in both formats
        (1, "10", 4.0, 964982703, "click"), (2, "10", 3.5, 964982704, None), (None, "11", 3.0, 1, "view"),
        (1, "11", None, 964982705, "view"), (3, "12", 2e6, 964982706, "click"), (3, "", 4.0, 964982707, "click"),
        (4, "13", 5.0, 964982708, "teleport"), (4, "12", 1.0, None, "purchase"), (5, "14", float("nan"), 3, "click"),
    ]
    users, items, scores, whens, kinds = (list(c) for c in zip(*rows))
    parquet = _parquet(tmp_path / "ratings.parquet", {"userId": users, "movieId": items, "score": scores,
                                                      "when": whens, "kind": kinds, "unused": [0] * len(rows)})
    csv_path = tmp_path / "ratings.csv"
    csv_path.write_text("userId,movieId,score,when,kind\n" + "".join(
        ",".join("" if v is None else str(v) for v in row) + "\n" for row in rows))
    columns = {"user_id": "userId", "item_id": "movieId", "rating": "score", "ts": "when", "event_type": "kind"}
    results = {}
    for path in (parquet, csv_path):
        state = RecState(CFG)
        results[path.suffix] = replay_file(state, EventDecoder(EventsConfig()), path, columns=columns, ts_unit="s"), state
    (a, from_parquet), (b, from_csv) = results[".parquet"], results[".csv"]
    # "teleport" is no event type, but the row has a rating: explicit feedback, applied.
    assert (a.events_applied, a.rejected) == (b.events_applied, b.rejected) == (5, 4)
    assert from_parquet.model.users.ids.ids == from_csv.model.users.ids.ids == ["1", "2", "4"]
    _same(from_parquet, from_csv)
    assert from_parquet.model.global_mean == from_csv.model.global_mean == pytest.approx((4.0 + 3.5 + 5.0 + 1.0) / 4)


def test_parquet_time_columns_keep_their_own_unit(tmp_path):
    pa = pytest.importorskip("pyarrow")
    stamps = pa.array([1_700_000_000_123_456, None], type=pa.timestamp("us", tz="UTC"))
    path = _parquet(tmp_path / "log.parquet", {"user_id": ["a", "b"], "item_id": ["x", "y"], "ts": stamps})
    batch = next(read_event_log(path, EventDecoder(EventsConfig()), ts_unit="s")).batch
    assert batch.timestamps.tolist() == [1_700_000_000_123, -1]


def test_a_missing_mapped_column_is_named_for_csv_and_parquet(tmp_path):
    csv_path = tmp_path / "log.csv"
    csv_path.write_text("user,item\n1,2\n")
    parquet = _parquet(tmp_path / "log.parquet", {"user": [1], "item": [2]})
    errors = []
    for path in (csv_path, parquet):
        for columns in ({"user_id": "user", "item_id": "movie"}, {"user_id": "user", "item_id": "item", "rating": "stars"}):
            with pytest.raises(ConfigError) as info:
                list(read_event_log(path, EventDecoder(EventsConfig()), columns))
            errors.append(str(info.value).replace(str(path), "PATH"))
    assert errors[:2] == errors[2:]
    assert "has no column(s) ['movie'] (it has ['user', 'item'])" in errors[0] and "['stars']" in errors[1]
    float_ids = _parquet(tmp_path / "floats.parquet", {"user_id": [1.0], "item_id": ["a"]})
    with pytest.raises(ConfigError, match="ids must be strings or integers"):
        list(read_event_log(float_ids, EventDecoder(EventsConfig())))


def test_eval_reads_parquet_with_a_weight_column_as_it_reads_csv(tmp_path):
    from recstream.stream.cli import _load_interactions, build_parser
    from recstream.stream.config import load_config

    rows = [("a", 1, 3.0), ("b", 2, None), ("a", 2, 0.5), (None, 3, 1.0), ("c", 1, 12.0)]
    parquet = _parquet(tmp_path / "plays.parquet", {"who": [r[0] for r in rows], "what": [r[1] for r in rows],
                                                    "plays": [r[2] for r in rows]})
    csv_path = tmp_path / "plays.csv"
    csv_path.write_text("who,what,plays\n" + "".join(",".join("" if v is None else str(v) for v in r) + "\n"
                                                     for r in rows))
    loaded = []
    for path in (parquet, csv_path):
        args = build_parser().parse_args(["eval", "--events", str(path), "--mode", "implicit",
                                          "--columns", "user_id=who,item_id=what,weight=plays"])
        data, rejected = _load_interactions(args, load_config(None, {}))
        loaded.append((list(data.user_ids), list(data.item_ids), data.weights.tolist(), rejected))
    assert loaded[0] == loaded[1] == (["a", "b", "a", "c"], ["1", "2", "2", "1"], [3.0, 1.0, 0.5, 12.0],
                                      {"missing user_id": 1})


def test_read_ahead_raises_the_readers_error_in_order_and_an_early_exit_closes_the_reader():
    def chunks():
        yield from (1, 2)
        raise ValueError("line 3 is not JSON")

    got = []
    with pytest.raises(ValueError, match="line 3"):
        for chunk in read_ahead(chunks()):
            got.append(chunk)
    assert got == [1, 2]

    closed = []

    def endless():
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            closed.append(True)

    for chunk in read_ahead(endless(), depth=2):
        if chunk == 5:
            break
    assert closed == [True]
