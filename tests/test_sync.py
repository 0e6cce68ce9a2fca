"""Item deltas between members of a group (embeddings/sync.py), without a broker."""

from __future__ import annotations

import numpy as np
import pytest
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.embeddings.sgd import MAX_COMPONENT
from recstream.embeddings.sync import InvalidDelta, ItemDelta, ItemSync

CONFIG = MFConfig(dim=8, seed=3)


def _learn(model: OnlineMF, users: list[str], items: list[str]) -> None:
    model.learn(users, items, weights=np.ones(len(users), dtype=np.float32))


def _stream(seed: int, n: int = 400) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    return ([f"u{u}" for u in rng.integers(0, 50, n)], [f"i{i}" for i in rng.zipf(1.5, n) % 60])


def _exchange(*syncs: ItemSync) -> None:
    messages = [m for s in syncs for m in s.take()]
    for sync in syncs:
        for message in messages:
            sync.apply(ItemDelta.decode(message.encode()))


def _items(model: OnlineMF) -> dict[str, np.ndarray]:
    return {key: model.items.vectors[model.items.ids.get(key)].copy() for key in model.items.ids.ids}


def test_members_that_exchange_deltas_hold_the_same_items() -> None:
    members = [OnlineMF(CONFIG) for _ in range(3)]
    syncs = [ItemSync(m, f"m{k}") for k, m in enumerate(members)]
    for round_ in range(4):
        for k, model in enumerate(members):
            _learn(model, *_stream(10 * round_ + k))
        _exchange(*syncs)
    first = _items(members[0])
    for other in members[1:]:
        vectors = _items(other)
        assert vectors.keys() == first.keys()
        for key in first:
            np.testing.assert_allclose(vectors[key], first[key], atol=1e-5)
    counts = [int(m.interaction_counts(np.arange(len(m.items))).sum()) for m in members]
    assert counts == [3 * 4 * 400] * 3  # every event counted once on every member


def test_nothing_changed_sends_nothing_and_one_member_is_unchanged() -> None:
    model = OnlineMF(CONFIG)
    sync = ItemSync(model, "solo")
    _learn(model, *_stream(1))
    before = model.items.vectors.copy()
    assert len(sync.take()) == 1
    assert sync.take() == []
    np.testing.assert_array_equal(model.items.vectors, before)


def test_a_delta_is_applied_once() -> None:
    a, b = OnlineMF(CONFIG), OnlineMF(CONFIG)
    sync_a, sync_b = ItemSync(a, "a"), ItemSync(b, "b")
    _learn(a, *_stream(2))
    messages = sync_a.take()
    assert sum(sync_b.apply(m) for m in messages) > 0
    once = b.items.vectors.copy()
    assert sum(sync_b.apply(m) for m in messages) == 0
    np.testing.assert_array_equal(b.items.vectors, once)


def test_messages_split_into_parts_are_all_applied() -> None:
    a, b = OnlineMF(CONFIG), OnlineMF(CONFIG)
    sync_a, sync_b = ItemSync(a, "a"), ItemSync(b, "b")
    _learn(a, *_stream(4))
    messages = sync_a.take(per_message=7)
    assert len(messages) > 2 and {m.parts for m in messages} == {len(messages)}
    assert sum(sync_b.apply(m) for m in messages) == len(a.items)
    np.testing.assert_allclose(_items(b)["i1"], _items(a)["i1"], atol=1e-6)


def test_a_restarted_member_counts_its_own_later_deltas_as_sent() -> None:
    """Restored from a checkpoint taken before a send, a member reads that send back: it must not
    send those changes again once it has relearned them from the replayed input."""
    a, b = OnlineMF(CONFIG), OnlineMF(CONFIG)
    sync_a, sync_b = ItemSync(a, "a"), ItemSync(b, "b")
    _learn(a, *_stream(5))
    arrays, meta, model_state = sync_a.to_arrays(), sync_a.to_meta(), {k: v.copy() for k, v in a.state_arrays().items()}
    _learn(a, *_stream(6))
    sent = sync_a.take()
    for m in sent:
        sync_b.apply(m)
    # "crash": a restarts from the checkpoint, replays the same input, reads its own send back
    restarted = OnlineMF(CONFIG)
    restarted.load_state_arrays(model_state)
    sync_r = ItemSync(restarted, "a")
    sync_r.load(arrays, meta)
    _learn(restarted, *_stream(6))
    for m in sent:
        assert sync_r.apply(m) == 0  # not added to its vectors: it learned them itself
    assert sync_r.seq == sync_a.seq
    # Not sent again: what is left is float32 rounding of base + delta (the replay is deterministic).
    resent = sync_r.take()
    assert all(np.abs(m.vector_array()).max() < 1e-6 and not m.event_array().any() for m in resent)


def test_state_round_trip_keeps_what_was_sent() -> None:
    a = OnlineMF(CONFIG)
    sync_a = ItemSync(a, "a")
    _learn(a, *_stream(7))
    sync_a.take()
    sync_a.apply(ItemDelta("b", 4, 0, 1, CONFIG.dim, ["i1"], np.ones((1, 8), "<f4").tobytes(),
                           np.zeros((1, 8), "<f4").tobytes(), np.zeros(1, "<f4").tobytes(),
                           np.ones(1, "<i8").tobytes()))
    restored = ItemSync(a, "a")
    restored.load(sync_a.to_arrays(), sync_a.to_meta())
    assert restored.take() == [] and restored.seq == sync_a.seq and restored.applied == {"b": (4, 0)}


@pytest.mark.parametrize("data, reason", [
    (b"\x00\x01garbage", "not an item delta"),
    (ItemDelta("b", 1, 0, 1, 8, ["x"], b"\x00" * 4, b"\x00" * 32, b"\x00" * 4, b"\x00" * 8).encode(), "vectors has 4"),
    (ItemDelta("b", 1, 0, 1, 8, ["x"], np.full(8, np.nan, "<f4").tobytes(), b"\x00" * 32, b"\x00" * 4,
               b"\x00" * 8).encode(), "non-finite"),
    (ItemDelta("b", 1, 2, 1, 8, [], b"", b"", b"", b"").encode(), "part 2/1"),
])
def test_bad_messages_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidDelta, match=reason):
        ItemDelta.decode(data)


def test_another_dimension_is_refused() -> None:
    sync = ItemSync(OnlineMF(CONFIG), "a")
    delta = ItemDelta("b", 1, 0, 1, 4, ["x"], b"\x00" * 16, b"\x00" * 16, b"\x00" * 4, b"\x00" * 8)
    with pytest.raises(InvalidDelta, match="dimension 4"):
        sync.apply(delta)


def test_huge_deltas_are_clipped_and_leave_the_model_finite() -> None:
    model = OnlineMF(CONFIG)
    sync = ItemSync(model, "a")
    big = np.full((1, 8), 3e38, "<f4")
    for seq in (1, 2):  # two maximal floats summed would overflow to inf without the clip
        sync.apply(ItemDelta("b", seq, 0, 1, 8, ["x"], big.tobytes(), big.tobytes(),
                             np.full(1, 3e38, "<f4").tobytes(), np.ones(1, "<i8").tobytes()))
    row = model.items.ids.get("x")
    assert np.isfinite(model.items.vectors[row]).all() and model.items.vectors[row].max() == MAX_COMPONENT
    _learn(model, ["u"] * 5, ["x"] * 5)
    assert np.isfinite(model.items.vectors[: len(model.items)]).all()
    assert sync.take() != []  # learning moved it; the clipped sum itself is not resent


def test_a_member_that_starts_from_a_snapshot_counts_every_event_once() -> None:
    """A late member restores another member's snapshot (its base: what was sent, not what it has
    learned since) and reads the deltas from there; a delta before that place read again is
    skipped, as the snapshot includes it."""
    a, b, late = OnlineMF(CONFIG), OnlineMF(CONFIG), OnlineMF(CONFIG)
    sync_a, sync_b, sync_late = ItemSync(a, "a"), ItemSync(b, "b"), ItemSync(late, "late")
    topic: list[bytes] = []

    def send(*syncs: ItemSync) -> None:
        sent = [m.encode() for s in syncs for m in s.take(per_message=9)]
        topic.extend(sent)
        for s in (sync_a, sync_b):
            for data in sent:
                s.apply(ItemDelta.decode(data))

    _learn(a, *_stream(20))
    _learn(b, *_stream(21))
    send(sync_a, sync_b)
    _learn(a, *_stream(22))  # learned, not sent: not in the snapshot
    chunks, included = sync_a.snapshot(per_message=13)
    position = len(topic)
    assert len(chunks) > 1 and sync_late.restore_snapshot(chunks, included) == len(a.items)
    _learn(b, *_stream(23))
    send(sync_a, sync_b)
    for data in topic[position - 3:]:  # (from a little before the snapshot's place: those are skipped)
        sync_late.apply(ItemDelta.decode(data))
    events = 4 * 400
    for model in (a, b, late):
        assert int(model.interaction_counts(np.arange(len(model.items))).sum()) == events
    for key, vector in _items(a).items():
        np.testing.assert_allclose(_items(late)[key], vector, atol=1e-5)
        np.testing.assert_allclose(_items(b)[key], vector, atol=1e-5)


def test_transition_vectors_moved_as_a_previous_item_reach_the_other_members() -> None:
    """An item's transition vector moves when it is a user's previous item, not only when it is
    clicked: that marks it changed too, or its move would never be sent."""
    config = MFConfig(dim=8, seed=3, n_negatives=0)  # (a sampled negative is marked changed anyway)
    a, b = OnlineMF(config), OnlineMF(config)
    sync_a, sync_b = ItemSync(a, "a"), ItemSync(b, "b")
    for model, seed in ((a, 30), (b, 31)):
        users, items = _stream(seed)
        model.learn_rows(model.users.rows(users), model.items.rows(items), np.full(len(users), np.nan, np.float32),
                         np.ones(len(users), np.float32), None, 1_700_000_000_000 + 1_000 * np.arange(len(users)))
    _exchange(sync_a, sync_b)
    # Then a's users click only new items: the items they clicked before move as previous items alone.
    users = [f"u{u}" for u in range(50)]
    before = a.item_transitions(slice(0, len(a.items)))
    a.learn_rows(a.users.rows(users), a.items.rows([f"new{u}" for u in range(50)]), np.full(50, np.nan, np.float32),
                 np.ones(50, np.float32), None, 1_700_000_000_000 + 500_000 + np.arange(50))
    assert (a.item_transitions(slice(0, len(before))) != before).any()
    _exchange(sync_a, sync_b)
    for key in a.items.ids.ids:
        ra, rb = a.items.ids.get(key), b.items.ids.get(key)
        np.testing.assert_allclose(a.item_transitions(np.array([ra])), b.item_transitions(np.array([rb])), atol=1e-6)
