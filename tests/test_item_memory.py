"""Bounded memory for items: the item cap with least-recently-active eviction, item expiry, and a
forgotten item's row cleared everywhere it is referred to before a new item takes it."""

import dataclasses
import threading

import numpy as np
import orjson
import pytest
from recstream.embeddings.model import _ITEM_ARRAYS, MFConfig, OnlineMF
from recstream.embeddings.sync import ItemSync
from recstream.index.query import Recommender
from recstream.index.refresh import IndexConfig, IndexRefresher
from recstream.stream.checkpoint import CheckpointStore
from recstream.stream.config import ConfigError, load_config
from recstream.stream.events import EventBatch
from recstream.stream.state import RecState
from test_memory import _assert_same_state, _batch, _cut

from conftest import event, produce, read_all, running, service_config, wait_for

CFG = MFConfig(dim=8, seed=3, max_items=60, item_ttl_s=600, negative_pool=512, rating_replay_pool=256)
T0 = 1_700_000_000_000


def _item_flood(n=3000, seed=0, new_share=0.5) -> EventBatch:
    """About ``new_share`` of the events are on items never seen before, the rest on 40 regular
    items, from 80 users; ratings on every third event; time moves 1-60 s per event."""
    rng = np.random.default_rng(seed)
    items = np.where(rng.random(n) < new_share, 1000 + np.arange(n), rng.integers(0, 40, n))
    users = rng.integers(0, 80, n)
    ts = T0 + np.cumsum(rng.integers(1_000, 60_000, n))
    ratings = np.where(np.arange(n) % 3 == 0, rng.integers(1, 6, n).astype(np.float32), np.nan)
    return _batch(users, items, ts, ratings, sessions=1 + users * 100 + np.arange(n) // 500)  # a few events each


def _references(state: RecState, row: int) -> dict[str, bool]:
    """Where item ``row`` is still referred to (besides its own arrays)."""
    model, sessions = state.model, state.sessions
    arrays = model.state_arrays()
    pool_filled = int(arrays["negative_pool_state"][1])
    replay_filled = int(arrays["rating_replay.state"][1])
    n_users = len(model.users)
    model.activity()  # (fits the per-user arrays to the table)
    hist_held = np.arange(sessions.length) < np.minimum(sessions.hlen[:n_users], sessions.length)[:, None]
    ring_held = np.arange(sessions.ring.items.shape[1]) < sessions.ring.lengths[:, None]
    return {
        "history": bool((state.history.to_arrays()["items"] == row).any()),
        "last item": bool((model._last_item[:n_users] == row).any()),
        "negative pool": bool((arrays["negative_pool"][:pool_filled] == row).any()),
        "rating replay": bool((arrays["rating_replay.items"][:replay_filled] == row).any()),
        "rules as neighbour": bool((sessions.rules.rows == row).any()),
        "co-occurrence as neighbour": bool((sessions.cooc.rows == row).any()),
        "rules row": bool((sessions.rules.rows[row] >= 0).any()),
        "co-occurrence row": bool((sessions.cooc.rows[row] >= 0).any()),
        "session ring": bool(((sessions.ring.items == row) & ring_held).any()),
        "ring index": bool(sessions.ring.item_heads[row] or sessions.ring.item_serials[row].any()),
        "current sessions": bool(((sessions.hist[:n_users] == row) & hist_held).any()),
        "content": row in state.content.items().tolist(),
    }


def test_the_item_cap_forgets_the_least_recently_active_items_first():
    state = RecState(dataclasses.replace(CFG, max_items=3, item_ttl_s=0))  # forgets 1 at a time (2% of 3)
    state.apply(_batch(["u", "u", "u", "v"], ["a", "b", "c", "a"], [10, 20, 30, 40]))
    state.apply(_batch(["u"], ["d"], [5]))  # "b" is the least recently active (by input order, not event time)
    ids = state.model.items.ids
    assert ids.get("b") is None and all(ids.get(i) is not None for i in "acd")
    assert ids.live == 3 and len(ids) == 3 and ids.get("d") == 1  # d took b's row
    state.apply(_batch(["v", "v"], ["c", "e"], [50, 60]))  # "a" is now the oldest
    assert ids.get("a") is None and ids.live == 3 and state.items_forgotten == 2 and state.users_forgotten == 0


def test_items_expire_after_the_ttl_of_event_time_without_events():
    state = RecState(dataclasses.replace(CFG, max_items=0, item_ttl_s=100))
    state.apply(_batch(["u", "u"], ["old", "kept"], [T0, T0]))
    state.apply(_batch(["v"], ["kept"], [T0 + 90_000]))
    state.apply(_batch(["w"], ["other"], [T0 + 107_000]))  # 107 s after "old": past its TTL and a sweep
    ids = state.model.items.ids
    assert ids.get("old") is None and ids.get("kept") is not None and ids.get("other") == 0  # old's row
    assert ids.free.tolist() == [] and state.items_forgotten == 1
    assert list(state.history.items_of(state.model.users.ids.get("u"))) == [ids.get("kept")]  # "old" left u's history
    state.apply(_batch(["u"], ["old"], [T0 + 200_000]))  # back after 200 s: a new item
    assert ids.get("kept") is None and state.model.interaction_counts(np.array([ids.get("old")])).tolist() == [1]


@pytest.mark.parametrize("cuts", [[1], [7, 500, 501, 1999], list(range(100, 3000, 100))])
def test_forgetting_items_is_the_same_however_the_events_are_batched(cuts):
    config = dataclasses.replace(CFG, max_users=30, user_ttl_s=900)  # users and items forgotten in the same runs
    events = _item_flood()
    whole, pieces = RecState(config), RecState(config)
    whole.apply(events)
    for batch in _cut(events, cuts):
        pieces.apply(batch)
    assert whole.items_forgotten > 1000 and whole.users_forgotten > 0
    assert whole.model.items.ids.live <= CFG.max_items and len(whole.model.items) <= CFG.max_items
    _assert_same_state(whole, pieces, versions=False)
    assert whole.model.items.ids.ids == pieces.model.items.ids.ids


def test_a_forgotten_items_row_is_cleared_everywhere_and_holds_what_a_new_items_row_holds():
    state = RecState(dataclasses.replace(CFG, max_items=0, item_ttl_s=0))
    events = _item_flood(3000, new_share=0)  # regulars only: every structure refers to them
    state.apply(events)
    state.set_item_metadata(["7"], [{"genres": "Drama"}], [None])
    ids = state.model.items.ids
    row = ids.get("7")
    before = _references(state, row)
    assert all(before.values()), before  # (a real check: each place held the item)
    seen = []
    state.model.item_forget_hooks.append(seen.append)  # another per-item copy, as a sync module would keep
    state.model.forget_items(np.array([row]))
    assert [r.tolist() for r in seen] == [[row]] and state.items_forgotten == 1
    after = _references(state, row)
    assert not any(after.values()), after
    # The rest of the sessions and histories are kept, in order.
    assert len(state.history.to_arrays()["items"]) > 0 and (state.sessions.rules.rows >= 0).any()
    assert state.model.items.rows(["fresh"]).tolist() == [row] and ids.get("7") is None
    new = RecState(CFG)
    new.model.items.rows(["fresh"])
    model, fresh = state.model, new.model
    np.testing.assert_array_equal(model.items.vectors[row], fresh.items.vectors[0])
    assert model.items.biases[row] == 0 and model.items.vectors[row].any()  # (init_std > 0: the vector is checked)
    model.item_activity(), fresh.item_activity()  # (fits the per-item arrays to the table)
    for spec in _ITEM_ARRAYS:
        if spec.reset_on_forget and spec.attr != "_item_seq":  # (versions: the row counts as changed)
            np.testing.assert_array_equal(getattr(model, spec.attr)[row], getattr(fresh, spec.attr)[0], spec.attr)
    # Learning on goes on finite and the new item of the row starts its history afresh.
    state.apply(_batch(["0", "1"], ["fresh", "fresh"], [events.timestamps[-1] + 1] * 2))
    assert state.model.interaction_counts(np.array([row])).tolist() == [2]


def test_a_forgotten_item_is_never_recommended_not_even_from_an_index_built_before(tmp_path):
    rng = np.random.default_rng(2)
    mf = OnlineMF(MFConfig(dim=8, seed=2, negative_pool=64))
    n = 20_000
    mf.learn([f"u{x}" for x in rng.integers(0, 200, n)], [f"i{x}" for x in rng.integers(0, 2000, n)])
    users = mf.users.rows([f"u{x}" for x in range(50)])
    star = int(np.flatnonzero(mf._pool_count[: len(mf.items)] == 0)[0])  # an item outside the hot set
    mf.items.biases[:] -= 10  # every item scores below 0, what a free row (zero vector and bias) scores ...
    mf.items.biases[star] = 100  # ... but this one, the best for everyone by far
    refresher = IndexRefresher(mf, threading.Lock(), tmp_path, IndexConfig(n_trees=10))
    index = refresher.rebuild()
    recommender = Recommender(mf, None, k=10, exact_items=32, search_k=10**6)
    assert (recommender.recommend(users, index).item_rows[:, 0] == star).all()  # found through the index
    assert recommender.last.index_lookups > 0

    mf.forget_items(np.array([star]))
    top = recommender.recommend(users, index).item_rows
    assert not (top == star).any() and (top >= 0).all()  # not the free row either, whose score is the best
    assert not (Recommender(mf, None, k=10).recommend(users, None).item_rows == star).any()  # exact: every row

    mf.items.rows(["newcomer"])  # takes the row; the index still holds the forgotten item's point there
    mf.items.biases[star] = 100
    assert not (recommender.recommend(users, index).item_rows == star).any()  # not from the stale entry
    index = refresher.rebuild()  # once built into the index it is found as any other item
    assert index.n_items == mf.items.ids.live
    assert (recommender.recommend(users, index).item_rows[:, 0] == star).all()


@pytest.mark.parametrize("restart", [False, True])
def test_group_sync_sends_a_new_item_on_a_forgotten_items_row_as_a_new_item(restart):
    """A member forgets an item; the new item taking its row is sent as what it learned from its
    own initial vector (not from the zeros the forgotten row held), also across a restart."""
    a, b = OnlineMF(MFConfig(dim=8, seed=3)), OnlineMF(MFConfig(dim=8, seed=3))
    sync_a, sync_b = ItemSync(a, "a"), ItemSync(b, "b")
    a.learn([f"u{x % 7}" for x in range(200)], [f"x{x % 10}" for x in range(200)])
    for message in sync_a.take():
        sync_b.apply(message)
    row = a.items.ids.get("x3")
    a.forget_items(np.array([row]))
    assert all("x3" not in m.ids for m in sync_a.take())  # forgetting is not a change to send
    if restart:
        arrays, meta = sync_a.to_arrays(), sync_a.to_meta()
        sync_a = ItemSync(a, "a")
        sync_a.load(arrays, meta)
    a.learn(["u1"] * 5, ["newcomer"] * 5)
    assert a.items.ids.get("newcomer") == row
    for message in sync_a.take():
        sync_b.apply(message)
    newcomer = b.items.ids.get("newcomer")
    np.testing.assert_allclose(b.items.vectors[newcomer], a.items.vectors[row], atol=1e-6)
    assert b.interaction_counts(np.array([newcomer])).tolist() == [5]


def test_items_that_other_members_change_count_as_active_on_this_one():
    state = RecState(dataclasses.replace(CFG, max_items=3, item_ttl_s=0))
    other = OnlineMF(state.model.config)
    sync, their_sync = ItemSync(state.model, "me"), ItemSync(other, "them")
    state.apply(_batch(["u", "u", "u"], ["a", "b", "c"], [T0, T0 + 1, T0 + 2]))
    other.learn(["v"], ["a"])
    for message in their_sync.take():
        sync.apply(message)  # "a" moved in the group after b and c moved here
    state.apply(_batch(["u"], ["d"], [T0 + 3]))
    ids = state.model.items.ids
    assert ids.get("b") is None and ids.get("a") is not None


def test_similar_items_never_answer_with_a_forgotten_item():
    from http import HTTPStatus

    from recstream.stream.service import RecStreamService
    from recstream.stream.web import HttpError, ServiceHttp

    service = RecStreamService(load_config(overrides={"model.dim": 8, "index.n_trees": 5}))  # no broker needed
    rng = np.random.default_rng(4)
    n = 5000
    service.state.apply(_batch(rng.integers(0, 100, n), rng.integers(0, 300, n), np.arange(n) * 1000 + 1))
    service.refresher.rebuild()
    ids = service.model.items.ids
    forgotten = [str(x) for x in range(0, 300, 2) if ids.get(str(x)) is not None]
    rows = np.array([ids.get(x) for x in forgotten])
    service.model.forget_items(rows)  # after the build: the index holds them
    http = ServiceHttp(service)
    with pytest.raises(HttpError) as error:
        http.similar(forgotten[0], {})
    assert error.value.status == HTTPStatus.NOT_FOUND
    for item in ("1", "3"):
        answer = {x["item_id"] for x in http.similar(item, {"k": ["100"]})["items"]}
        assert answer and not answer & {"", *forgotten} and answer <= set(ids.ids)
    service.state.apply(_batch(["u1"] * 20, [f"new{x}" for x in range(20)], [n * 1000 + 1] * 20))  # rows reused
    assert ids.get("new0") == rows.min()  # (the index's entry at the row is a forgotten item's)
    assert {x["item_id"] for x in http.similar("new0", {})["items"]} <= set(ids.ids) - {"", "new0"}


def test_free_rows_stay_out_of_the_index(tmp_path):
    mf = OnlineMF(MFConfig(dim=8, seed=2))
    mf.learn([f"u{x % 30}" for x in range(600)], [f"i{x % 100}" for x in range(600)])
    mf.forget_items(np.arange(0, 100, 3))
    index = IndexRefresher(mf, threading.Lock(), tmp_path, IndexConfig(n_trees=5)).rebuild()
    everything = index.nearest([1.0] * 8 + [1.0, 0.0], 1000, search_k=10**6)
    assert index.n_items == 66 and sorted(everything) == np.setdiff1d(np.arange(100), np.arange(0, 100, 3)).tolist()


def test_a_checkpoint_round_trip_keeps_item_activity_and_continues_as_an_uninterrupted_run(tmp_path):
    events = _item_flood(4000, seed=1)
    first, second = _cut(events, [2500])
    whole = RecState(CFG)
    whole.apply(events)
    part = RecState(CFG)
    part.apply(first)
    store = CheckpointStore(tmp_path)
    part.save(store)
    resumed = RecState.restore(store.load_latest(), CFG)
    n = len(part.model.items)
    for mine, theirs in zip(resumed.model.item_activity(), part.model.item_activity()):
        np.testing.assert_array_equal(mine[:n], theirs[:n])
    assert resumed.item_expiry.to_arrays()["state"].tolist() == part.item_expiry.to_arrays()["state"].tolist()
    assert resumed.model.items.ids.free.tolist() == part.model.items.ids.free.tolist()
    resumed.apply(second)
    assert whole.items_forgotten > 1000
    _assert_same_state(whole, resumed, versions=False)


def test_a_checkpoint_from_before_item_bounded_memory_loads_with_every_item_active(tmp_path):
    state = RecState(dataclasses.replace(CFG, max_items=0, item_ttl_s=0))
    state.apply(_item_flood(300, new_share=0.2))
    arrays, meta = state.snapshot()
    for name in ("item_expiry.state", "model.item_last_active", "model.item_last_seq"):
        del arrays[name]
    store = CheckpointStore(tmp_path)
    store.save(arrays, meta)
    restored = RecState.restore(store.load_latest(), dataclasses.replace(CFG, max_items=0))  # expiry only
    clock = int(state.model.item_activity()[0].max())
    assert restored.item_expiry.clock == clock
    assert (restored.model.item_activity()[0][: len(restored.model.items)] == clock).all()
    restored.apply(_batch(["u"], ["new"], [clock + 1]))  # the TTL counts from the newest event: nothing expires
    assert restored.items_forgotten == 0


def test_items_announced_by_metadata_count_as_active_when_announced():
    state = RecState(dataclasses.replace(CFG, max_items=4, item_ttl_s=100))
    state.apply(_batch(["u", "u", "u"], ["a", "b", "c"], [T0, T0 + 1000, T0 + 2000]))
    state.set_item_metadata(["meta"], [{"genres": "Drama"}], [None])
    state.apply(_batch(["u"], ["d"], [T0 + 50_000]))  # a fifth item: the least recently active, "a", goes
    ids = state.model.items.ids
    assert ids.get("a") is None and ids.get("meta") is not None and ids.live == 4
    state.apply(_batch(["u"], ["d"], [T0 + 101_500]))  # b's last event is 100.5 s old; meta came at T0 + 2 s
    assert ids.get("b") is None and ids.get("meta") is not None


def test_metadata_alone_cannot_grow_the_items_past_the_cap():
    state = RecState(dataclasses.replace(CFG, max_items=50, item_ttl_s=0))
    state.apply(_batch(["u"] * 30, [f"clicked{x}" for x in range(30)], T0 + np.arange(30)))
    for start in range(0, 200, 40):  # a catalogue announced in parts, no events
        ids = [f"m{x}" for x in range(start, start + 40)]
        state.set_item_metadata(ids, [{"genres": "Drama"}] * 40, [None] * 40)
        # Rows are a high-water mark: a batch's new items come first, then the eviction.
        assert state.model.items.ids.live <= 50 and len(state.model.items) <= 50 + 40
    ids = state.model.items.ids
    assert ids.get("m199") is not None and ids.get("clicked0") is None  # the least recently active went first
    assert all(ids.get(f"m{x}") is not None for x in range(160, 200))  # the last batch is kept
    assert not any(ids.get(f"clicked{x}") is not None for x in range(29))  # (29's last event ties with metadata)
    held = np.setdiff1d(np.arange(len(ids)), ids.free)
    assert set(state.content.items().tolist()) <= set(held.tolist())  # no features left on a free row


def test_items_of_handed_over_users_count_as_active_on_the_member_taking_them():
    from recstream.stream.handover import export_users, import_users

    sender = RecState(dataclasses.replace(CFG, max_items=0, item_ttl_s=0))
    sender.apply(_batch(["u"] * 5, [f"x{x}" for x in range(5)], T0 + np.arange(5)))
    taker = RecState(dataclasses.replace(CFG, max_items=6, item_ttl_s=0))
    taker.apply(_batch(["v"] * 4, [f"y{x}" for x in range(4)], T0 + np.arange(4)))
    import_users(taker, export_users(sender, sender.model.users.rows(["u"]), "h", 0, 0))
    ids = taker.model.items.ids
    assert ids.live == 6 and all(ids.get(f"x{x}") is not None for x in range(5))  # u's items came last: kept
    assert [ids.get(f"y{x}") is None for x in range(4)] == [True, True, True, False]
    assert len(taker.history.items_of(taker.model.users.ids.get("u"))) == 5


def test_bad_item_memory_settings_stop_start_up_naming_the_field():
    for key, value in (("model.max_items", -1), ("model.item_ttl_s", 0.5), ("model.item_ttl_s", -3),
                       ("model.max_items", "many")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(overrides={key: value})
    config = load_config(overrides={"model.max_items": "1000", "model.item_ttl_s": 86400})
    assert (config.model.max_items, config.model.item_ttl_s) == (1000, 86400)


def test_a_service_with_item_expiry_never_publishes_a_forgotten_item(kafka_bootstrap, topics, tmp_path):
    """Old items expire when newer events come; every update is built from held items, and each
    user's last one has only the new items (their lists are short: each user saw most of them,
    and the free rows left by the old items must not fill the rest)."""
    old = [f"a{x}" for x in range(40)]
    new = [f"b{x}" for x in range(20)]
    first = [event(f"u{u}", item, ts=T0 + 1000 * n) for u in range(20) for n, item in enumerate(old[u:u + 20])]
    then = [event(f"u{u}", item, ts=T0 + 7_200_000 + 1000 * n)  # 2 h later: the old items' TTL is 1 h
            for u in range(20) for n, item in enumerate((new * 2)[u:u + 15])]
    config = service_config(kafka_bootstrap, topics, **{"model.item_ttl_s": 3600, "output.top_k": 10,
                                                       "state_dir": str(tmp_path / "state")})
    with running(config) as service:
        # In two steps: the partitions' events interleave, and an old item's event read after the
        # new ones would bring it back as a new item.
        for messages, applied in ((first, len(first)), (then, len(first) + len(then))):
            produce(kafka_bootstrap, topics["input"], messages)
            wait_for(lambda: service.stats.events_applied == applied, what="all events applied")
        wait_for(lambda: service.stats.commits > 0 and not service.offsets, what="a commit of everything")
        assert service.state.items_forgotten == 39 and len(service.model.items.ids.free) == 39 - len(new)
    updates = read_all(kafka_bootstrap, topics["output"], expect=service.stats.updates_published)
    assert len(updates) == service.stats.updates_published > 0
    last = {}
    for m in updates:
        items = [x["item_id"] for x in orjson.loads(m.value())["items"]]
        assert set(items) <= set(old) | set(new)  # no free row's empty id
        last[m.key().decode()] = items
    assert len(last) == 20 and all(set(items) <= set(new) and len(items) <= 5 for items in last.values())
    assert sum(map(len, last.values())) > 0


def test_a_capped_service_keeps_running_on_a_flood_of_new_items_within_its_cap(kafka_bootstrap, topics, tmp_path):
    flood = _item_flood(12_000, seed=5, new_share=0.8)
    messages = [event(u, i, ts=int(t)) for u, i, t in zip(flood.user_ids, flood.item_ids, flood.timestamps.tolist())]
    produce(kafka_bootstrap, topics["input"], messages)
    cap = 500
    config = service_config(kafka_bootstrap, topics, **{"model.max_items": cap, "loop.batch_size": 1000,
                                                       "state_dir": str(tmp_path / "state")})
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == len(messages), what="all events applied")
        wait_for(lambda: service.stats.commits > 0 and not service.offsets, what="a commit of everything")
        forgotten = service.state.items_forgotten
        activity = [a[: len(service.model.items)].copy() for a in service.model.item_activity()]
    # The table never grew past the cap (its row count is its high-water mark), and most items came and went.
    assert len(service.model.items) <= cap and forgotten > len(set(flood.item_ids)) - cap
    updates = read_all(kafka_bootstrap, topics["output"], expect=service.stats.updates_published)
    assert len(updates) == service.stats.updates_published > 0
    published = {x["item_id"] for m in updates for x in orjson.loads(m.value())["items"]}
    assert published and published <= set(flood.item_ids)  # real items only, no free row's empty id
    with running(config) as restarted:  # the checkpoint keeps the free rows and the items' activity
        wait_for(lambda: restarted.stats.assigned, what="an assignment")
        assert restarted.model.items.ids.ids == service.model.items.ids.ids
        for mine, theirs in zip(restarted.model.item_activity(), activity):
            np.testing.assert_array_equal(mine[: len(theirs)], theirs)
