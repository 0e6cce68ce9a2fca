"""Members of one consumer group share item state through the sync topic (on the real broker)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from contextlib import ExitStack

import numpy as np
import orjson
import pytest
from recstream.stream.broker import create_topics
from recstream.stream.config import ConfigError, item_snapshot_topic_for, sync_topic_for, user_state_topic_for

from conftest import committed_offsets, produce, read_all, running, service_config, wait_for

PARTITIONS = 4


@pytest.fixture
def group_topics(kafka_bootstrap: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    names = {"input": f"clicks-{tag}", "output": f"recs-{tag}", "dlq": f"clicks-{tag}.dlq", "group": f"g-{tag}"}
    create_topics(kafka_bootstrap, {names["input"]: PARTITIONS, names["output"]: PARTITIONS, names["dlq"]: 1,
                                    sync_topic_for(names["group"]): 1, user_state_topic_for(names["group"]): PARTITIONS,
                                    item_snapshot_topic_for(names["group"]): 1},
                  topic_configs={user_state_topic_for(names["group"]): {"cleanup.policy": "compact"},
                                 item_snapshot_topic_for(names["group"]): {"cleanup.policy": "compact"}})
    return names


def _events(n: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """Implicit events of 200 users on 40 items (popular ones with hundreds of events), keyed by user."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 200, n), rng.zipf(1.3, n) % 40
    return [(f"u{u}".encode(), orjson.dumps({"user_id": f"u{u}", "item_id": f"i{i}", "ts": 1_700_000_000_000 + k}))
            for k, (u, i) in enumerate(zip(users.tolist(), items.tolist()))]


def _member_config(bootstrap: str, topics: dict[str, str], **overrides: object):
    return service_config(bootstrap, topics, **{"topics.group_id": topics["group"], "sync.interval_s": 0.3,
                                                "sync.mode": "on", **overrides})


def _item_vectors(service) -> dict[str, np.ndarray]:
    with service.model_lock:
        items = service.model.items
        return {key: items.vectors[items.ids.get(key)].copy() for key in items.ids.ids}


def _item_events(service, key: str) -> int:
    with service.model_lock:
        return int(service.model.interaction_counts(np.array([service.model.items.ids.get(key)]))[0])


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")], ids=["two", "three"])
def test_members_hold_the_same_item_vectors(kafka_bootstrap: str, group_topics: dict[str, str],
                                            names: tuple[str, ...]) -> None:
    events = _events(6000)
    with ExitStack() as stack:
        members = [stack.enter_context(running(_member_config(kafka_bootstrap, group_topics, **{"sync.member": m})))
                   for m in names]
        wait_for(lambda: sum(len(m.stats.assigned) for m in members) == PARTITIONS
                 and all(len(m.stats.assigned) for m in members), timeout_s=60, what="every member assigned")
        produce(kafka_bootstrap, group_topics["input"], events)
        wait_for(lambda: sum(m.stats.events_applied for m in members) >= len(events), timeout_s=90,
                 what="the group to apply every event")
        assert all(m.stats.events_applied > 0 for m in members), "a member learned nothing: no group"
        counts: dict[str, int] = {}
        for _, value in events:
            item = orjson.loads(value)["item_id"]
            counts[item] = counts.get(item, 0) + 1
        # Every member counts every event of the group on the item, exactly once, after a sync.
        wait_for(lambda: all(_item_events(m, item) == counts[item] for m in members for item in counts),
                 timeout_s=30, what="each member to hold the group's event counts")
        vectors = [_item_vectors(m) for m in members]
        assert all(v.keys() == counts.keys() for v in vectors)
        for item, n in counts.items():
            if n >= 20:
                for other in vectors[1:]:
                    a, b = vectors[0][item], other[item]
                    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.99, item
        assert all(m.stats.sync_items_sent and m.stats.sync_items_received for m in members)
        # Each member's session signals learned every click of the others' users too (sync.sessions).
        wait_for(lambda: all(m.stats.sync_clicks_sent == m.stats.events_applied
                             and m.stats.sync_clicks_received == len(events) - m.stats.events_applied
                             for m in members), timeout_s=30, what="each member to learn the others' session clicks")


def test_a_bad_sync_message_is_a_dead_letter_and_the_member_keeps_going(
        kafka_bootstrap: str, group_topics: dict[str, str]) -> None:
    produce(kafka_bootstrap, sync_topic_for(group_topics["group"]), [(b"mallory", b"\x93not a delta")])
    events = _events(500, seed=1)
    with running(_member_config(kafka_bootstrap, group_topics)) as service:
        produce(kafka_bootstrap, group_topics["input"], events)
        wait_for(lambda: service.stats.events_applied >= len(events), timeout_s=60, what="every event applied")
        letters = read_all(kafka_bootstrap, group_topics["dlq"], expect=1)
    assert service.stats.dead_letters == 1 and service.stats.sync_items_received == 0
    reason = dict(letters[0].headers())["recstream.error"].decode()
    assert reason.startswith("bad item delta: not an item delta"), reason


def test_sync_on_without_its_topic_stops_start_up_naming_the_setting(kafka_bootstrap: str,
                                                                      topics: dict[str, str]) -> None:
    config = service_config(kafka_bootstrap, topics, **{"sync.mode": "on"})
    with pytest.raises(ConfigError, match="sync.mode: on, but the sync topic"):
        with running(config):
            pass


def test_a_member_stopped_and_restarted_counts_every_event_once(kafka_bootstrap: str, group_topics: dict[str, str],
                                                                 tmp_path) -> None:
    """SIGTERM-like stop, the other member takes over, the first comes back from its checkpoint:
    its own last deltas are not sent twice, the other's sent meanwhile are applied once."""
    first, second = _events(3000, seed=2), _events(3000, seed=3)
    config_a = _member_config(kafka_bootstrap, group_topics, state_dir=str(tmp_path / "a"))
    config_b = _member_config(kafka_bootstrap, group_topics, state_dir=str(tmp_path / "b"))
    counts: dict[str, int] = {}
    for _, value in first + second:
        item = orjson.loads(value)["item_id"]
        counts[item] = counts.get(item, 0) + 1
    with running(config_b) as b:
        with running(config_a) as a:
            wait_for(lambda: a.stats.assigned and b.stats.assigned, timeout_s=60, what="both members assigned")
            produce(kafka_bootstrap, group_topics["input"], first)
            wait_for(lambda: a.stats.events_applied + b.stats.events_applied >= len(first), timeout_s=90,
                     what="the first half applied")
            member_a = a.state.item_sync.member
        applied_by_a = a.stats.events_applied
        produce(kafka_bootstrap, group_topics["input"], second)  # b alone, then with a again
        with running(config_a) as a2:
            wait_for(lambda: a2.state.item_sync is not None, timeout_s=60, what="the member to start its sync")
            assert a2.state.item_sync.member == member_a  # the same member, from its state dir
            wait_for(lambda: applied_by_a + a2.stats.events_applied + b.stats.events_applied
                     >= len(first) + len(second), timeout_s=90, what="the second half applied")
            wait_for(lambda: all(_item_events(m, item) == counts[item] for m in (a2, b) for item in counts),
                     timeout_s=30, what="each member to hold the group's event counts")


def _user_vectors(service) -> dict[str, np.ndarray]:
    with service.model_lock:
        users = service.model.users
        free = set(users.ids.free.tolist())
        return {users.ids.id_of(row): users.vectors[row].copy() for row in range(len(users)) if row not in free}


def test_users_go_with_their_partition_to_a_member_that_joins(kafka_bootstrap: str, group_topics: dict[str, str],
                                                               tmp_path) -> None:
    events = _events(4000, seed=4)
    with running(_member_config(kafka_bootstrap, group_topics, state_dir=str(tmp_path / "a"))) as a:
        produce(kafka_bootstrap, group_topics["input"], events)
        wait_for(lambda: a.stats.events_applied >= len(events), timeout_s=90, what="the first member to apply all")
        before = _user_vectors(a)
        assert len(before) == 200
        with running(_member_config(kafka_bootstrap, group_topics, state_dir=str(tmp_path / "b"))) as b:
            wait_for(lambda: len(a.stats.assigned) == len(b.stats.assigned) == PARTITIONS // 2, timeout_s=90,
                     what="the partitions shared by both members")
            wait_for(lambda: len(_user_vectors(a)) + len(_user_vectors(b)) == len(before), timeout_s=60,
                     what="every user held by exactly one member")
            after_a, after_b = _user_vectors(a), _user_vectors(b)
            assert b.stats.users_taken_over == len(after_b) and a.stats.users_handed_over == len(before)
            assert after_b and after_a.keys().isdisjoint(after_b.keys())
            for user, vector in {**after_a, **after_b}.items():
                np.testing.assert_array_equal(vector, before[user])  # the vectors they had, not fresh ones
            with b.model_lock:
                partitions = {p for _, p in b.stats.assigned}
                rows = np.array([b.model.users.ids.get(u) for u in after_b])
                assert set(b.model.input_partitions()[rows].tolist()) <= partitions
                assert int(b.model.activity()[0][rows].max()) > 0  # their activity came along
                assert sum(len(b.state.history.items_of(int(r))) for r in rows) > 0  # and their histories
        # b stops (as on SIGTERM): its partitions and their users come back to a as they were.
        wait_for(lambda: len(a.stats.assigned) == PARTITIONS and len(_user_vectors(a)) == len(before), timeout_s=90,
                 what="the first member to take every partition and user back")
        for user, vector in _user_vectors(a).items():
            np.testing.assert_array_equal(vector, before[user])


def test_a_member_that_starts_late_starts_from_the_groups_item_snapshot(kafka_bootstrap: str,
                                                                        group_topics: dict[str, str],
                                                                        tmp_path) -> None:
    """A member that joins with no state restores the items the member holding partition 0 wrote,
    reads the deltas from the snapshot's place on, and counts every event of the group once."""
    events = _events(6000, seed=5)
    counts: dict[str, int] = {}
    for _, value in events:
        item = orjson.loads(value)["item_id"]
        counts[item] = counts.get(item, 0) + 1
    snapshots = {"sync.snapshot_interval_s": 0.5}
    with running(_member_config(kafka_bootstrap, group_topics, state_dir=str(tmp_path / "a"), **snapshots)) as a:
        produce(kafka_bootstrap, group_topics["input"], events[:3000])
        wait_for(lambda: a.stats.events_applied >= 3000 and a.stats.sync_items_sent > 0, timeout_s=90,
                 what="the first member to apply and send the first half")
        written = a.stats.sync_snapshots_written
        wait_for(lambda: a.stats.sync_snapshots_written >= written + 2, timeout_s=30, what="two more snapshots")
        with running(_member_config(kafka_bootstrap, group_topics, state_dir=str(tmp_path / "late"),
                                    **snapshots)) as late:
            wait_for(lambda: len(late.stats.assigned) == PARTITIONS // 2, timeout_s=90, what="the late member's share")
            assert late.stats.sync_snapshot_items == len({orjson.loads(v)["item_id"] for _, v in events[:3000]})
            produce(kafka_bootstrap, group_topics["input"], events[3000:])
            wait_for(lambda: a.stats.events_applied + late.stats.events_applied >= len(events), timeout_s=90,
                     what="the group to apply every event")
            assert late.stats.events_applied > 0
            wait_for(lambda: all(_item_events(m, item) == counts[item] for m in (a, late) for item in counts),
                     timeout_s=30, what="each member to hold the group's event counts")
            vectors = [_item_vectors(m) for m in (a, late)]
            for item, n in counts.items():
                if n >= 20:
                    x, y = vectors[0][item], vectors[1][item]
                    assert float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) >= 0.99, item


SYNC_ARGS = ("--set", "sync.mode=on", "--set", "sync.interval_s=0.5")


def _produce_clicks_in_background(bootstrap: str, topic: str, n: int, rate: float
                                  ) -> tuple[threading.Thread, list[int]]:
    """``n`` clicks (event k to partition k % PARTITIONS) produced at ``rate`` events/s on a
    thread; returns it and the events per partition."""
    from test_faults import _produce_partitioned

    values = [orjson.dumps({"user_id": f"u{k % 400}", "item_id": f"i{k % 53}", "ts": 1_700_000_000_000 + k})
              for k in range(n)]
    producer = threading.Thread(target=_produce_partitioned, args=(bootstrap, topic, values, PARTITIONS, rate))
    producer.start()
    return producer, [len(range(p, n, PARTITIONS)) for p in range(PARTITIONS)]


def _restart_after_kill_9(bootstrap: str, group_topics: dict[str, str], state_dir, process):
    """SIGKILL ``process`` (the member of ``state_dir``) and start it again, once it is consuming."""
    import signal

    from test_faults import _start

    process.send_signal(signal.SIGKILL)
    process.wait()
    log = state_dir.parent / f"{state_dir.name}.log"
    runs_before = log.read_text().count("consuming ")
    process = _start(bootstrap, group_topics, group_topics["group"], state_dir, *SYNC_ARGS)
    # (Signalled before its handler is installed, a process just dies: wait until it runs.)
    wait_for(lambda: log.read_text().count("consuming ") > runs_before, timeout_s=120,
             what="the restarted member to start consuming")
    return process


def _applied_by_members_at_the_end(bootstrap: str, group_topics: dict[str, str], tmp_path, members: dict,
                                   counts: list[int]) -> list[dict[str, int]]:
    """Wait for the group to commit every partition's end, stop the members (SIGTERM) and check
    that each partition's events were applied at least once and at most twice across them (a
    kill -9's bound, docs/scale-out.md); returns each member's applied counts."""
    import signal

    from test_faults import _latest_meta

    wait_for(lambda: list(committed_offsets(bootstrap, group_topics["group"], group_topics["input"],
                                            PARTITIONS).values()) == counts,
             timeout_s=180, what="the group to commit the end of every partition")
    for process in members.values():
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    applied = [_latest_meta(tmp_path / name).get("applied", {}) for name in members]
    for p in range(PARTITIONS):
        key = f"{group_topics['input']}/{p}"
        total = sum(counts_of.get(key, 0) for counts_of in applied)
        assert counts[p] <= total <= 2 * counts[p], (p, counts[p], applied)
    return applied


def test_a_member_killed_with_9_loses_no_event_of_the_group(kafka_bootstrap: str, group_topics: dict[str, str],
                                                            tmp_path) -> None:
    """kill -9 of one of two members mid-stream, then restarted: every event of every partition is
    applied by some member, and none more than twice: a member killed between writing a checkpoint
    and committing it leaves those events to the partition's next owner as well (docs/scale-out.md)."""
    from test_faults import _latest_meta, _start

    producer, counts = _produce_clicks_in_background(kafka_bootstrap, group_topics["input"], 60_000, 6000)
    a = _start(kafka_bootstrap, group_topics, group_topics["group"], tmp_path / "a", *SYNC_ARGS)
    b = _start(kafka_bootstrap, group_topics, group_topics["group"], tmp_path / "b", *SYNC_ARGS)
    wait_for(lambda: _latest_meta(tmp_path / "a").get("events_applied", 0) > 0
             and _latest_meta(tmp_path / "b").get("events_applied", 0) > 0, timeout_s=120,
             what="both members to apply and checkpoint events")
    time.sleep(random.uniform(0.0, 1.5))
    a = _restart_after_kill_9(kafka_bootstrap, group_topics, tmp_path / "a", a)
    producer.join()
    _applied_by_members_at_the_end(kafka_bootstrap, group_topics, tmp_path, {"a": a, "b": b}, counts)


def test_a_member_killed_with_9_while_its_partitions_move_loses_no_event(kafka_bootstrap: str,
                                                                         group_topics: dict[str, str],
                                                                         tmp_path) -> None:
    """kill -9 of a member in the middle of handing its partitions over (it logged the revoke, a
    second member is joining), then restarted: as for any kill -9, every event of every partition
    is applied by some member, and none more than twice (docs/scale-out.md)."""
    from test_faults import _latest_meta, _start

    producer, counts = _produce_clicks_in_background(kafka_bootstrap, group_topics["input"], 80_000, 4000)
    a = _start(kafka_bootstrap, group_topics, group_topics["group"], tmp_path / "a", *SYNC_ARGS)
    wait_for(lambda: _latest_meta(tmp_path / "a").get("events_applied", 0) > 0, timeout_s=120,
             what="the first member to apply and checkpoint events")
    log = tmp_path / "a.log"
    revokes = log.read_text().count("revoked [")
    b = _start(kafka_bootstrap, group_topics, group_topics["group"], tmp_path / "b", *SYNC_ARGS)
    wait_for(lambda: log.read_text().count("revoked [") > revokes, timeout_s=120,
             what="the first member to start handing its partitions over")
    time.sleep(random.uniform(0.0, 0.2))
    a = _restart_after_kill_9(kafka_bootstrap, group_topics, tmp_path / "a", a)
    producer.join()
    applied = _applied_by_members_at_the_end(kafka_bootstrap, group_topics, tmp_path, {"a": a, "b": b}, counts)
    assert applied[1], "the second member never got partitions while the stream ran"


def test_handover_chunks_stay_under_the_size_limit_and_carry_every_user(monkeypatch) -> None:
    """Users with long histories are cut into more chunks (Kafka refuses messages over 1 MB by
    default); reading the chunks back gives every user with their vector and history."""
    from recstream.embeddings.model import MFConfig
    from recstream.stream import handover as module
    from recstream.stream.events import EventBatch
    from recstream.stream.state import RecState

    rng = np.random.default_rng(0)
    n = 3000
    users, items = [f"u{u}" for u in rng.integers(0, 60, n)], [f"item-{i:06d}" for i in rng.integers(0, 2000, n)]
    state = RecState(MFConfig(dim=8))
    state.apply(EventBatch(users, items, np.full(n, np.nan, np.float32), np.ones(n, np.float32),
                           np.arange(1, n + 1, dtype=np.int64), list(range(n))), "clicks", np.zeros(n, np.int64))
    monkeypatch.setattr(module, "CHUNK_BYTES", 4000)
    sent: list[tuple[bytes, bytes]] = []
    handover = module.UserHandover("t", {}, lambda topic, key, value, partition: sent.append((key, value)))
    rows = state.users_of_partition(0)
    chunks = handover.write(state, 0, rows, offset=n)
    assert chunks == len(sent) - 1 > 2 and sent[-1][0] == b"0/marker"
    decoded = [module._DECODE_CHUNK(value) for _, value in sent[:-1]]
    assert all(len(value) <= 4000 or len(chunk.users) == 1 for (_, value), chunk in zip(sent, decoded))
    other = RecState(MFConfig(dim=8))
    for chunk in decoded:
        module.import_users(other, chunk)
    assert len(other.model.users) == len(rows)
    for user in ("u0", "u17", "u59"):
        a, b = state.model.users.ids.get(user), other.model.users.ids.get(user)
        np.testing.assert_array_equal(other.model.users.vectors[b], state.model.users.vectors[a])
        assert ([state.model.items.ids.id_of(i) for i in state.history.items_of(a)]
                == [other.model.items.ids.id_of(i) for i in other.history.items_of(b)])
