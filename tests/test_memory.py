"""Bounded memory: user expiry, the user cap with least-recently-active eviction, row reuse."""

import dataclasses
import threading

import numpy as np
import pytest
from recstream.embeddings.model import _USER_ARRAYS, MFConfig, OnlineMF
from recstream.index.build import mips_query
from recstream.index.query import Recommender
from recstream.index.refresh import IndexConfig, IndexRefresher
from recstream.stream.checkpoint import CheckpointStore
from recstream.stream.config import ConfigError, load_config
from recstream.stream.events import EventBatch
from recstream.stream.publishing import PendingUpdates
from recstream.stream.state import RecState

from conftest import event, produce, read_all, running, service_config, wait_for

CFG = MFConfig(dim=8, seed=3, user_init_std=0.1, max_users=40, user_ttl_s=600)


def _batch(users, items, ts, ratings=None, sessions=None) -> EventBatch:
    n = len(users)
    return EventBatch([str(u) for u in users], [str(i) for i in items],
                      np.full(n, np.nan, np.float32) if ratings is None else np.asarray(ratings, np.float32),
                      np.ones(n, np.float32), np.asarray(ts, np.int64), list(range(n)),
                      None if sessions is None else np.asarray(sessions, np.int64))


def _flood(n=3000, seed=0, new_share=0.5) -> EventBatch:
    """A stream where about ``new_share`` of the events come from users never seen before, the rest
    from a few regulars; ratings on every third event; time moves 1-60 s per event."""
    rng = np.random.default_rng(seed)
    regular = rng.integers(0, 30, n)
    users = np.where(rng.random(n) < new_share, 1000 + np.arange(n), regular)
    items = rng.integers(0, 200, n)
    ts = 1_700_000_000_000 + np.cumsum(rng.integers(1_000, 60_000, n))
    ratings = np.where(np.arange(n) % 3 == 0, rng.integers(1, 6, n).astype(np.float32), np.nan)
    return _batch(users, items, ts, ratings, sessions=rng.integers(1, 50, n))


def _cut(batch: EventBatch, cuts: list[int]) -> list[EventBatch]:
    bounds = [0, *cuts, len(batch)]
    return [EventBatch(batch.user_ids[a:b], batch.item_ids[a:b], batch.ratings[a:b], batch.weights[a:b],
                       batch.timestamps[a:b], list(range(b - a)),
                       None if batch.session_keys is None else batch.session_keys[a:b])
            for a, b in zip(bounds, bounds[1:])]


# Model versions count learning calls (one per run of a batch), so they depend on the batching.
_VERSIONS = ("model.item_seq", "model.counters")


def _assert_same_state(a: RecState, b: RecState, versions: bool = True) -> None:
    (arrays_a, _), (arrays_b, _) = a.snapshot(), b.snapshot()
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        if versions or name not in _VERSIONS:
            np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    assert a.model.users.ids.ids == b.model.users.ids.ids and a.model.events_applied == b.model.events_applied


def test_the_cap_forgets_the_least_recently_active_users_first():
    state = RecState(dataclasses.replace(CFG, max_users=3, user_ttl_s=0))  # forgets 1 at a time (2% of 3)
    state.apply(_batch(["a", "b", "c", "a"], [1, 2, 3, 4], [10, 20, 30, 40]))
    state.apply(_batch(["d"], [5], [5]))  # "b" is the least recently active (by input order, not event time)
    ids = state.model.users.ids
    assert ids.get("b") is None and {u for u in "acd" if ids.get(u) is not None} == set("acd")
    assert ids.live == 3 and len(ids) == 3 and ids.get("d") == 1  # d took b's row
    state.apply(_batch(["c", "e"], [6, 7], [50, 60]))  # "a" is now the oldest
    assert ids.get("a") is None and ids.live == 3 and state.users_forgotten == 2


def test_a_reused_row_holds_exactly_what_a_new_users_row_holds():
    state = RecState(dataclasses.replace(CFG, max_users=0, user_ttl_s=0))
    state.apply(_flood(500, new_share=0))  # regulars only: learned vectors, history, sessions, ratings
    ids = state.model.users.ids
    row = ids.get("7")
    assert len(state.history.items_of(row)) and state.sessions.hlen[row] and state.model.users.vectors[row].any()
    state.forget_users(np.array([row]))
    assert state.model.users.rows(["zed"]).tolist() == [row] and ids.get("7") is None
    fresh = RecState(CFG)
    fresh.model.users.rows(["zed"])
    model, new = state.model, fresh.model
    assert model.users.initial_vectors(np.array([row])).any()  # user_init_std > 0: a real check of the vector
    np.testing.assert_array_equal(model.users.vectors[row], new.users.vectors[0])
    np.testing.assert_array_equal(model.users.biases[row], new.users.biases[0])
    model.activity(), new.activity()  # (fits the per-user arrays to the table)
    for spec in _USER_ARRAYS:
        np.testing.assert_array_equal(getattr(model, spec.attr)[row], getattr(new, spec.attr)[0], err_msg=spec.attr)
    assert not state.history.items_of(row)
    for name in ("hist", "hlen", "last_ts", "skey", "serial"):
        np.testing.assert_array_equal(getattr(state.sessions, name)[row], getattr(fresh.sessions, name)[0], name)
    assert row not in state.model.state_arrays()["rating_replay.users"][: int(state.model.state_arrays()
                                                                               ["rating_replay.state"][1])]


def test_forgotten_users_leave_the_rating_replay_ring():
    state = RecState(dataclasses.replace(CFG, max_users=2, user_ttl_s=0))
    state.apply(_batch(["a", "a", "b"], [1, 2, 3], [1, 2, 3], ratings=[4, 5, 3]))
    state.apply(_batch(["c"], [4], [4], ratings=[2]))  # forgets "a" (least recently active)
    ring = state.model.state_arrays()
    filled = int(ring["rating_replay.state"][1])
    assert filled == 2 and ring["rating_replay.users"][:filled].tolist() == [1, 0]  # b's, then c's (in a's old row)
    assert state.model.users.ids.get("c") == 0 and state.model.users.ids.get("b") == 1


def test_users_expire_after_the_ttl_of_event_time_without_events():
    state = RecState(dataclasses.replace(CFG, max_users=0, user_ttl_s=100))
    t0 = 1_700_000_000_000
    state.apply(_batch(["old", "kept"], [1, 2], [t0, t0]))
    state.apply(_batch(["kept"], [3], [t0 + 90_000]))
    state.apply(_batch(["other"], [4], [t0 + 107_000]))  # 107 s after "old": past its TTL and a sweep
    ids = state.model.users.ids
    assert ids.get("old") is None and ids.get("kept") is not None and ids.get("other") is not None
    assert ids.free.tolist() == [] and ids.get("other") == 0  # "other" came after the sweep: old's row
    state.apply(_batch(["old"], [1], [t0 + 200_000]))  # back after 200 s: a new user
    assert state.history.items_of(ids.get("old")) == {state.model.items.ids.get("1"): None}
    assert ids.get("kept") is None  # 110 s idle by now


@pytest.mark.parametrize("cuts", [[1], [7, 500, 501, 1999], list(range(100, 3000, 100))])
def test_forgetting_is_the_same_however_the_events_are_batched(cuts):
    events = _flood()
    whole, pieces = RecState(CFG), RecState(CFG)
    whole.apply(events)
    for batch in _cut(events, cuts):
        pieces.apply(batch)
    assert whole.users_forgotten > 1000 and whole.model.users.ids.live <= CFG.max_users
    _assert_same_state(whole, pieces, versions=False)


def test_a_checkpoint_round_trip_then_continuing_equals_an_uninterrupted_run(tmp_path):
    events = _flood(4000, seed=1)
    first, second = _cut(events, [2500])
    whole = RecState(CFG)
    whole.apply(events)
    part = RecState(CFG)
    part.apply(first)
    store = CheckpointStore(tmp_path)
    part.save(store)
    resumed = RecState.restore(store.load_latest(), CFG)
    assert len(resumed.model.users.ids.free) == len(part.model.users.ids.free)
    resumed.apply(second)
    _assert_same_state(whole, resumed, versions=False)


def test_a_checkpoint_from_before_bounded_memory_loads_with_everyone_active(tmp_path):
    state = RecState(dataclasses.replace(CFG, max_users=0, user_ttl_s=0))
    state.apply(_flood(300, new_share=0.2))
    arrays, meta = state.snapshot()
    for name in ("expiry.state", "model.last_active", "model.last_seq", "model.users.free"):
        del arrays[name]
    store = CheckpointStore(tmp_path)
    store.save(arrays, meta)
    restored = RecState.restore(store.load_latest(), dataclasses.replace(CFG, max_users=0))  # expiry only
    clock = int(state.model.activity()[0].max())
    last_active = restored.model.activity()[0][: len(restored.model.users)]
    assert restored.expiry.clock == clock and (last_active == clock).all()
    restored.apply(_batch(["new"], [1], [clock + 1]))  # the TTL counts from the newest event: no one expires
    assert restored.users_forgotten == 0


def test_a_flood_of_new_users_keeps_every_array_finite_and_the_history_pool_bounded():
    state = RecState(dataclasses.replace(CFG, max_users=50))
    pools = []
    for seed in range(8):
        state.apply(_flood(2000, seed=seed, new_share=0.9))
        pools.append(len(state.history._pool))
    arrays, _ = state.snapshot()
    for name, value in arrays.items():
        if value.dtype.kind == "f":
            assert np.isfinite(value).all(), name
    assert state.model.users.ids.live <= 50 and len(state.model.users) <= 50
    assert pools[-1] == pools[2]  # compaction keeps the pool at its size once users churn


def test_updates_pending_for_forgotten_users_are_dropped():
    pending = PendingUpdates()
    pending.add(np.array([1, 2, 3]), np.array([10, 20, 30]))
    pending.forget(np.array([2, 9]))
    rows, times = pending.take()
    assert rows.tolist() == [1, 3] and times == [10, 30]


def test_bad_memory_settings_stop_start_up_naming_the_field():
    for key, value in (("model.max_users", -1), ("model.user_ttl_s", 0.5), ("model.user_ttl_s", -3)):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(overrides={key: value})
    assert load_config(overrides={"model.max_users": "1000"}).model.max_users == 1000


def test_a_capped_service_keeps_running_on_a_flood_of_new_users_within_its_cap(kafka_bootstrap, topics, tmp_path):
    flood = _flood(12_000, seed=5, new_share=0.8)
    messages = [event(u, i, ts=int(t)) for u, i, t in zip(flood.user_ids, flood.item_ids, flood.timestamps.tolist())]
    produce(kafka_bootstrap, topics["input"], messages)
    cap = 500
    config = service_config(kafka_bootstrap, topics, **{"model.max_users": cap, "loop.batch_size": 1000,
                                                       "state_dir": str(tmp_path / "state")})
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == len(messages), what="all events applied")
        wait_for(lambda: service.stats.commits > 0 and not service.offsets, what="a commit of everything")
        forgotten = service.state.users_forgotten
    # The table never grew past the cap (its row count is its high-water mark), and most users came and went.
    assert len(service.model.users) <= cap and forgotten > len(set(flood.user_ids)) - cap
    updates = read_all(kafka_bootstrap, topics["output"], expect=service.stats.updates_published)
    assert len(updates) == service.stats.updates_published > 0
    # Updates went to real users only (none to a row left free by a forgotten one).
    assert {m.key().decode() for m in updates} <= set(flood.user_ids)
    with running(config) as restarted:  # the checkpoint keeps the free rows and the activity
        wait_for(lambda: restarted.stats.assigned, what="an assignment")
        assert restarted.model.users.ids.live == service.model.users.ids.live
        assert restarted.model.users.ids.free.tolist() == service.model.users.ids.free.tolist()


def test_items_enter_the_index_and_recommendations_only_after_min_item_events(tmp_path):
    rng = np.random.default_rng(2)
    mf = OnlineMF(MFConfig(dim=8, seed=2, negative_pool=64))
    n = 20_000
    mf.learn([f"u{x}" for x in rng.integers(0, 200, n)], [f"i{x}" for x in rng.zipf(1.3, n) % 2000])
    counts = mf.interaction_counts(np.arange(len(mf.items)))
    rare = np.flatnonzero(counts < 5)
    assert 50 < len(rare) < len(counts) - 200  # many items below the threshold, many above
    refresher = IndexRefresher(mf, threading.Lock(), tmp_path, IndexConfig(n_trees=10, min_item_events=5))
    index = refresher.rebuild()
    assert index.n_items == np.count_nonzero(counts >= 5)
    everything = index.nearest(mips_query(np.ones(8, np.float32)), len(counts), search_k=10**8)
    assert sorted(everything) == np.flatnonzero(counts >= 5).tolist()
    # Recommendations skip them too, in the hot set (capped and not) and from the index's tail;
    # a rare item made the best for everyone shows that the filter, not its score, keeps it out.
    users = mf.users.rows([f"u{x}" for x in range(50)])
    mf.items.biases[rare[0]] = 100.0
    for exact_items in (None, 100):
        plain = Recommender(mf, None, k=10, exact_items=exact_items, search_k=10**6)
        assert (plain.recommend(users, index).item_rows[:, 0] == rare[0]).all()
        filtered = Recommender(mf, None, k=10, exact_items=exact_items, search_k=10**6, min_item_events=5)
        top = filtered.recommend(users, index).item_rows
        assert not np.isin(top, rare).any() and (top >= 0).all()
        assert filtered.hot_items(1.0, np.linalg.norm(mf.items.vectors, axis=1), mf.ranking_biases(),
                                  filtered.eligible()).tolist() != []


def test_min_item_events_must_be_positive():
    with pytest.raises(ConfigError, match=r"index\.min_item_events"):
        load_config(overrides={"index.min_item_events": 0})


def test_similar_items_leave_out_items_below_min_item_events(tmp_path):
    from recstream.stream.service import RecStreamService
    from recstream.stream.web import ServiceHttp

    config = load_config(overrides={"model.dim": 8, "index.min_item_events": 3, "index.n_trees": 5})
    service = RecStreamService(config)  # no broker needed: the HTTP side reads the state
    rng = np.random.default_rng(4)
    n = 5000
    service.state.apply(_batch(rng.integers(0, 100, n), rng.integers(0, 300, n) % 300, np.arange(n) * 1000 + 1))
    service.state.apply(_batch(["u1"] * 100, ["rare"] + [f"r{x}" for x in range(99)], [n * 1000 + 1] * 100))
    counts = service.model.interaction_counts(np.arange(len(service.model.items)))
    service.refresher.rebuild()
    http = ServiceHttp(service)
    ids = service.model.items.ids
    for item in ("5", "rare"):  # one in the index; one too rare for it (compared with every item exactly)
        answer = http.similar(item, {"k": ["100"]})
        assert answer["items"] and all(counts[ids.get(x["item_id"])] >= 3 for x in answer["items"])
        assert not {x["item_id"] for x in answer["items"]} & {"rare", *(f"r{x}" for x in range(99))}


def test_coded_id_columns_forget_exactly_as_plain_ones():
    from recstream.embeddings.ids import CodedIds

    events = _flood(2000, seed=3)

    def coded(ids):
        values, codes = np.unique(np.array(ids), return_inverse=True)
        return CodedIds.first_appearance(values.tolist(), codes)

    plain, columnar = RecState(CFG), RecState(CFG)
    for batch in _cut(events, [700, 1500]):
        plain.apply(batch)
        columnar.apply(EventBatch(coded(batch.user_ids), coded(batch.item_ids), batch.ratings, batch.weights,
                                  batch.timestamps, batch.positions, batch.session_keys))
    assert plain.users_forgotten > 500
    _assert_same_state(plain, columnar)
