"""Faults injected against a real broker: kill -9, rebalances, broker restarts, unwritable output,
fuzzed input, SIGTERM under load. The state must be what an uninterrupted run would have learned."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import Consumer, Producer
from prometheus_client.parser import text_string_to_metric_families
from recstream.embeddings.model import MFConfig
from recstream.stream.broker import create_topics, free_port, produce_waiting
from recstream.stream.config import EventsConfig
from recstream.stream.events import EventDecoder
from recstream.stream.replay import export_state
from recstream.stream.service import DLQ_REASON_HEADER
from recstream.stream.state import RecState
from recstream.stream.synthetic import SyntheticClickstream

from conftest import STARTED, cli_run_args, committed_offsets, read_all, running, service_config, wait_for

DIM = 16


def _topics(bootstrap: str, partitions: int) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    names = {"input": f"f-clicks-{tag}", "output": f"f-recs-{tag}", "dlq": f"f-clicks-{tag}.dlq"}
    create_topics(bootstrap, {names["input"]: partitions, names["output"]: 2, names["dlq"]: 1})
    return names


def _start(bootstrap: str, topics: dict, group: str, state_dir: Path, *extra: str) -> subprocess.Popen:
    args = cli_run_args(bootstrap, topics, group, "--state-dir", str(state_dir), "--set", f"model.dim={DIM}",
                        "--set", "checkpoint.interval_s=0.5", "--set", "output.flush_interval_s=0.25", *extra)
    log = open(state_dir.parent / f"{state_dir.name}.log", "ab")
    process = subprocess.Popen(args, stdout=log, stderr=log)
    STARTED.append(process)
    return process


def _latest_meta(state_dir: Path) -> dict:
    metas = sorted((state_dir / "checkpoints").glob("ckpt-*.json"))
    for path in reversed(metas):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return {}


def _checkpoint_names(state_dir: Path) -> set[str]:
    return {path.name for path in (state_dir / "checkpoints").glob("ckpt-*.json")}


def _produce_partitioned(bootstrap: str, topic: str, values: list[bytes], partitions: int,
                         rate: float | None = None) -> list[int]:
    """Produce in order, event n to partition n % partitions, at ``rate`` events/s; returns counts."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    started = time.monotonic()
    for n, value in enumerate(values):
        produce_waiting(producer, topic, value, partition=n % partitions)
        if rate and n % 1000 == 0:
            producer.poll(0)
            time.sleep(max(0.0, started + n / rate - time.monotonic()))
    assert producer.flush(60) == 0
    return [len(range(p, len(values), partitions)) for p in range(partitions)]


def _kill_restart_until_done(bootstrap, topics, state_dir, total, kills, seed) -> None:
    rng = random.Random(seed)
    group = f"g-{uuid.uuid4().hex[:8]}"
    for _ in range(kills):
        before = _checkpoint_names(state_dir)
        process = _start(bootstrap, topics, group, state_dir)
        # Killed at a random moment after the run wrote a checkpoint of its own, so that the next run
        # resumes mid-stream however long this machine takes to start a process.
        wait_for(lambda: _checkpoint_names(state_dir) - before, timeout_s=120, what="a checkpoint of this run")
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
    log = state_dir.parent / f"{state_dir.name}.log"
    runs_before = log.read_text().count("consuming ")
    process = _start(bootstrap, topics, group, state_dir)  # killed at teardown if a wait fails
    wait_for(lambda: log.read_text().count("consuming ") > runs_before, timeout_s=60,
             what="the final run to start consuming")
    wait_for(lambda: sum(_latest_meta(state_dir).get("positions", {}).values()) >= total, timeout_s=120,
             what="the final run to checkpoint the end of the input")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def _stream_with_kills(bootstrap, tmp_path, partitions: int, seed: int) -> tuple[dict, list[bytes], np.lib.npyio.NpzFile]:
    """200k events (a fifth of them ratings) produced live while the consumer is killed 3 times; returns
    topics, events, export."""
    topics = _topics(bootstrap, partitions)
    values = [v for _, v in SyntheticClickstream(n_users=3000, n_items=1000, seed=seed).events(200_000).messages()]
    # Every fifth event is a rating, so rating replays (and their ring in the checkpoints) take part.
    values[::5] = [orjson.dumps({**orjson.loads(v), "rating": 0.5 + n % 10 / 2}) for n, v in enumerate(values[::5])]
    producer = threading.Thread(target=_produce_partitioned,
                                args=(bootstrap, topics["input"], values, partitions, 25_000))
    producer.start()
    _kill_restart_until_done(bootstrap, topics, tmp_path / "state", len(values), kills=3, seed=seed + 6)
    producer.join()
    export_state(tmp_path / "state", tmp_path / "out.npz")
    return topics, values, np.load(tmp_path / "out.npz")


def test_kill_9_on_one_partition_leaves_exactly_the_uninterrupted_state(kafka_bootstrap, tmp_path):
    _, values, got = _stream_with_kills(kafka_bootstrap, tmp_path, partitions=1, seed=5)

    reference = RecState(MFConfig(dim=DIM))
    decoder = EventDecoder(EventsConfig())
    for start in range(0, len(values), 7919):  # other batch cuts than the service's: must not matter
        reference.apply(decoder.decode(values[start:start + 7919])[0])
    assert got["events_applied"].tolist() == [len(values)] and got["offsets"].tolist() == [len(values)]
    assert int(got["events_applied_total"]) == len(values)
    assert got["user_ids"].tolist() == reference.model.users.ids.ids
    np.testing.assert_allclose(got["user_vectors"], reference.model.users.vectors, atol=1e-6)
    np.testing.assert_allclose(got["item_vectors"], reference.model.items.vectors, atol=1e-6)
    np.testing.assert_allclose(got["user_bias"], reference.model.users.biases, atol=1e-6)
    np.testing.assert_allclose(got["item_bias"], reference.model.items.biases, atol=1e-6)
    log = (tmp_path / "state.log").read_text()
    # Restarts resumed from checkpoints, at least one of them mid-stream.
    restored = [int(line.split(" events, positions")[0].rsplit(" ", 1)[1])
                for line in log.splitlines() if "restored ckpt-" in line]
    assert len(restored) >= 2 and any(0 < n < len(values) for n in restored), restored


def test_kill_9_on_many_partitions_applies_each_event_once(kafka_bootstrap, tmp_path):
    topics, values, got = _stream_with_kills(kafka_bootstrap, tmp_path, partitions=3, seed=6)
    counts = [len(range(p, len(values), 3)) for p in range(3)]
    applied = dict(zip(got["partitions"].tolist(), got["events_applied"].tolist()))
    assert applied == {f"{topics['input']}/{p}": counts[p] for p in range(3)}
    assert int(got["events_applied_total"]) == len(values)


def test_a_second_process_joins_and_leaves_without_loss_or_double_application(kafka_bootstrap, tmp_path):
    topics = _topics(kafka_bootstrap, 4)
    values = [orjson.dumps({"user_id": f"u{n % 500}", "item_id": f"i{n % 97}"}) for n in range(120_000)]
    counts = [len(range(p, len(values), 4)) for p in range(4)]
    half = len(values) // 2  # a multiple of 4: the second half keeps event n on partition n % 4
    producer = threading.Thread(target=_produce_partitioned,
                                args=(kafka_bootstrap, topics["input"], values[:half], 4, 12_000))
    producer.start()
    group = f"g-{uuid.uuid4().hex[:8]}"
    first = _start(kafka_bootstrap, topics, group, tmp_path / "a")
    wait_for(lambda: _latest_meta(tmp_path / "a").get("events_applied", 0) > 0, timeout_s=120,
             what="the first process to apply and checkpoint events")
    second = _start(kafka_bootstrap, topics, group, tmp_path / "b")
    # The rest only once the second process has partitions: on a slow machine the first could
    # otherwise read everything before the second joins, and the second would apply nothing.
    wait_for(lambda: "assigned [" in (tmp_path / "b.log").read_text(), timeout_s=120,
             what="the second process to get partitions")
    producer.join()
    producer = threading.Thread(target=_produce_partitioned,
                                args=(kafka_bootstrap, topics["input"], values[half:], 4, 12_000))
    producer.start()
    wait_for(lambda: _latest_meta(tmp_path / "b").get("events_applied", 0) > 0, timeout_s=120,
             what="the second process to take over partitions")
    time.sleep(2)
    second.send_signal(signal.SIGTERM)  # leaves the group: its partitions go back to the first
    assert second.wait(timeout=60) == 0
    producer.join()
    # The group's commits, not the first process's checkpoints: when the second process had already
    # read to the end of a partition, the first takes it back with nothing new to apply or checkpoint.
    wait_for(lambda: list(committed_offsets(kafka_bootstrap, group, topics["input"], 4).values()) == counts,
             timeout_s=120, what="the group to commit the end of every partition")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0

    applied_a = _latest_meta(tmp_path / "a")["applied"]
    applied_b = _latest_meta(tmp_path / "b")["applied"]
    assert applied_b, "the second process applied nothing: no rebalance happened"
    for p in range(4):
        key = f"{topics['input']}/{p}"
        # Every event applied by exactly one process: together they cover each partition once.
        assert applied_a.get(key, 0) + applied_b.get(key, 0) == counts[p], (p, applied_a, applied_b)


def test_broker_outage_then_resume(restartable_broker, tmp_path):
    bootstrap = restartable_broker.bootstrap_servers
    topics = _topics(bootstrap, 2)
    config = service_config(bootstrap, topics, **{"state_dir": str(tmp_path / "state"),
                                                  "checkpoint.interval_s": 0.5})

    def send(n: int, prefix: str) -> None:
        _produce_partitioned(bootstrap, topics["input"],
                             [orjson.dumps({"user_id": f"{prefix}{k % 50}", "item_id": f"i{k % 40}"})
                              for k in range(n)], 2)

    send(1000, "before")
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 1000 and not service.offsets, what="first events")
        restartable_broker.stop()
        commits_at_outage = service.stats.commits
        time.sleep(10)
        assert service.stats.commits == commits_at_outage  # nothing committed while away
        restartable_broker.start()  # same port, same storage: topics and offsets are still there
        send(400, "after")
        wait_for(lambda: service.stats.events_applied >= 1400 and not service.offsets, timeout_s=90,
                 what="the events sent after the outage, committed")
        time.sleep(1)
        assert service.stats.events_applied == 1400  # resumed where it was: nothing lost, nothing twice
        assert service.stats.commits > commits_at_outage
    assert _latest_meta(tmp_path / "state")["applied"] == {f"{topics['input']}/{p}": 700 for p in range(2)}


def test_unwritable_output_holds_commits_back_and_retries(kafka_bootstrap, kafka_proxy, caplog):
    topics = _topics(kafka_bootstrap, 2)
    # The producer reaches the broker through a proxy; cutting it makes every delivery fail
    # while the consumer keeps reading.
    config = service_config(kafka_bootstrap, topics, **{
        "kafka.producer.bootstrap.servers": kafka_proxy.bootstrap_servers,
        "kafka.producer.message.timeout.ms": "1500",
    })
    values = [orjson.dumps({"user_id": f"u{k % 30}", "item_id": f"i{k % 20}"}) for k in range(600)]
    with running(config) as service:
        _produce_partitioned(kafka_bootstrap, topics["input"], values[:300], 2)
        wait_for(lambda: service.stats.events_applied == 300 and not service.offsets, what="first commit")
        kafka_proxy.stop()
        commits = service.stats.commits
        _produce_partitioned(kafka_bootstrap, topics["input"], values[300:], 2)
        wait_for(lambda: service.stats.delivery_failures > 0, timeout_s=30, what="delivery failures")
        time.sleep(2)
        assert service.stats.events_applied == 600
        assert service.stats.commits == commits and service.offsets  # held back
        kafka_proxy.start()
        wait_for(lambda: service.stats.commits > commits and not service.offsets, timeout_s=60,
                 what="commit after the output came back")
    assert "undelivered" in caplog.text and "offsets not committed" in caplog.text
    updates = read_all(kafka_bootstrap, topics["output"], expect=60, timeout_s=30)
    assert {m.key() for m in updates} >= {f"u{k}".encode() for k in range(30)}


def _fuzz(rng: random.Random, valid: list[bytes]) -> bytes | None:
    kind = rng.randrange(13)
    good = rng.choice(valid)
    if kind == 9:  # an unknown field nested ~1,000 levels deep (msgspec recurses into it)
        depth = rng.randrange(1000, 5000)
        return good[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == 10:  # a deeply nested id
        return b'{"item_id": "x", "user_id": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}"
    if kind == 11:  # an extreme rating or time
        return orjson.dumps({"user_id": "a", "item_id": "b", "rating": rng.choice([1e6, -1e6, 101.0, 1e30, 2.0**64])})
    if kind == 12:  # a large object (many keys) lacking an id
        return orjson.dumps({f"k{n}": n for n in range(rng.randrange(1000, 5000))} | {"user_id": "a"})
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:
        return good[: rng.randrange(1, len(good) - 1)]  # truncated JSON
    if kind == 2:
        return orjson.dumps({"user_id": rng.choice([1.5, True, [], {}, None]), "item_id": "x"})
    if kind == 3:
        return orjson.dumps({"user_id": "u" * rng.randrange(300, 5000), "item_id": "x"})  # huge id
    if kind == 4:
        return good.replace(b"}", b', "rating": NaN}')
    if kind == 5:
        return orjson.dumps({"item_id": "x"} if rng.random() < 0.5 else {"user_id": "x"})
    if kind == 6:
        return b'{"user_id": "a", "item_id": "b", "pad": "' + b"x" * (1 << 20) + b'"}'  # 1 MB value
    if kind == 7:
        return None
    return orjson.dumps({"user_id": "a", "item_id": "b", "rating": "five", "ts": -3})


def test_fuzzed_input_every_bad_message_in_the_dlq_every_good_one_applied(kafka_bootstrap):
    topics = _topics(kafka_bootstrap, 3)
    rng = random.Random(99)
    valid = [v for _, v in SyntheticClickstream(n_users=400, n_items=100, seed=9).events(20_000).messages()]
    stream, n_bad = [], 0
    for value in valid:
        stream.append(value)
        if rng.random() < 0.1:
            stream.append(_fuzz(rng, valid))
            n_bad += 1
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 4 << 20})
    for n, value in enumerate(stream):
        producer.produce(topics["input"], value=value, key=str(n).encode())
        if n % 1000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    config = service_config(kafka_bootstrap, topics)
    with running(config) as service:
        wait_for(lambda: service.stats.messages == len(stream) and not service.offsets, timeout_s=120,
                 what="every message handled")
        assert service.stats.events_applied == len(valid) and service.stats.dead_letters == n_bad
    letters = read_all(kafka_bootstrap, topics["dlq"], expect=n_bad, timeout_s=60)
    assert len(letters) == n_bad
    assert all(dict(m.headers()).get(DLQ_REASON_HEADER) for m in letters)
    originals = {str(n).encode(): v for n, v in enumerate(stream)}
    assert all(m.value() == originals[m.key()] for m in letters)  # original bytes, 1 MB ones too


def _partitions_applied(port: int) -> set[str]:
    """Partitions the service at ``port`` has applied events of, from its /metrics over HTTP."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:  # not listening yet
        return set()
    return {sample.labels["partition"] for family in text_string_to_metric_families(text)
            if family.name == "recstream_events_applied" for sample in family.samples if sample.value > 0}


def test_sigterm_under_load_checkpoints_commits_and_exits(kafka_bootstrap, tmp_path):
    topics = _topics(kafka_bootstrap, 2)
    values = [v for _, v in SyntheticClickstream(n_users=5000, n_items=2000, seed=4).events(150_000).messages()]
    producer = threading.Thread(target=_produce_partitioned,
                                args=(kafka_bootstrap, topics["input"], values, 2, 50_000))
    producer.start()
    group = f"g-{uuid.uuid4().hex[:8]}"
    secret = "hunter2-must-not-leak"
    port = free_port()
    process = _start(kafka_bootstrap, topics, group, tmp_path / "state", "--set", "checkpoint.interval_s=60",
                     "--http-port", str(port), "-X", "sasl.username=recstream", "-X", f"sasl.password={secret}")
    # Signalled while both partitions are being consumed (the producer is still at it), whenever
    # this machine gets there: the shutdown checkpoint and commit then cover two partitions mid-stream.
    wait_for(lambda: _partitions_applied(port) == {"0", "1"}, timeout_s=120,
             what="events applied on both partitions")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0  # the bound: finish the batch, checkpoint, commit, exit
    producer.join()
    meta = _latest_meta(tmp_path / "state")
    assert meta["events_applied"] > 0  # the shutdown checkpoint
    committed = committed_offsets(kafka_bootstrap, group, topics["input"], 2)
    assert {f"{topics['input']}/{p}": o for p, o in committed.items()} == meta["positions"]
    # Credentials passed to librdkafka appear in neither the log nor the checkpoints.
    assert secret not in (tmp_path / "state.log").read_text()
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_falling_back_to_an_older_checkpoint_reads_the_lost_events_again(kafka_bootstrap, tmp_path):
    topics = _topics(kafka_bootstrap, 1)
    values = [v for _, v in SyntheticClickstream(n_users=300, n_items=100, seed=3).events(5000).messages()]
    config = service_config(kafka_bootstrap, topics, **{"state_dir": str(tmp_path / "state"), "model.dim": DIM})
    _produce_partitioned(kafka_bootstrap, topics["input"], values[:3000], 1)
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 3000, what="first part")
    _produce_partitioned(kafka_bootstrap, topics["input"], values[3000:], 1)
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 2000, what="second part")
    # The newest checkpoint (and the commit that followed it) covers 5000 events; damage it.
    newest = sorted((tmp_path / "state" / "checkpoints").glob("ckpt-*.npz"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    with running(config) as service:  # restores the older checkpoint (3000) and reads 3000.. again
        wait_for(lambda: service.stats.events_applied == 2000, what="the lost events, again")
    export_state(tmp_path / "state", tmp_path / "out.npz")
    got = np.load(tmp_path / "out.npz")
    assert got["events_applied"].tolist() == [5000] and got["offsets"].tolist() == [5000]
    reference = RecState(MFConfig(dim=DIM))
    reference.apply(EventDecoder(EventsConfig()).decode(values)[0])
    np.testing.assert_array_equal(got["user_vectors"], reference.model.users.vectors)


def test_kill_9_while_updates_wait_loses_no_users_final_update(kafka_bootstrap, tmp_path):
    """Behind its input, a round publishes only what its time budget allows; the users left wait in
    the checkpoint that commits their events. Killed then, the next run publishes them."""
    topics = _topics(kafka_bootstrap, 2)
    n_users, t0 = 50_000, 1_700_000_000_000
    # The first half's users are not seen again: their update may only come from a waiting list.
    values = [orjson.dumps({"user_id": f"{'ab'[n // 200_000]}{n % n_users}", "item_id": f"i{n % 499}", "ts": t0 + n})
              for n in range(400_000)]
    last_ts = {f"{half}{u}": t0 + end - n_users + u for half, end in (("a", 200_000), ("b", 400_000))
               for u in range(n_users)}
    _produce_partitioned(kafka_bootstrap, topics["input"], values, 2)  # a backlog: the consumer is behind
    group, state_dir = f"g-{uuid.uuid4().hex[:8]}", tmp_path / "state"
    first = _start(kafka_bootstrap, topics, group, state_dir, "--set", "output.max_publish_share=0.1",
                   "--set", "loop.batch_size=2000")
    wait_for(lambda: _latest_meta(state_dir).get("pending_users", 0) > 0, timeout_s=120,
             what="a checkpoint carrying users whose update waits")
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = _start(kafka_bootstrap, topics, group, state_dir)
    wait_for(lambda: list(committed_offsets(kafka_bootstrap, group, topics["input"], 2).values()) == [200_000] * 2,
             timeout_s=120, what="the group to commit the end of the input")

    newest: dict[str, int] = {}
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topics["output"]])
    try:
        def every_user_has_their_final_update() -> bool:
            for m in consumer.consume(5000, 0.5):
                if m.error() is None:
                    user = m.key().decode()
                    newest[user] = max(newest.get(user, 0), orjson.loads(m.value())["last_event_ts"])
            return newest == last_ts

        wait_for(every_user_has_their_final_update, timeout_s=120, what="every user's final update")
    finally:
        consumer.close()
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0
