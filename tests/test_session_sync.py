"""Session signals shared by the members of a group: clicks travel with the item deltas
(embeddings/sync.py, SessionSignals.take_clicks / learn_remote), without a broker."""

from __future__ import annotations

import numpy as np
import pytest
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.embeddings.session import SessionSignals
from recstream.embeddings.sync import InvalidDelta, ItemDelta, ItemSync

CONFIG = MFConfig(dim=8, seed=3, session_ring=64, session_per_item=8)


class Member:
    """A member's model and session signals, learning clicks as ``RecState`` does."""

    def __init__(self, name: str) -> None:
        self.model = OnlineMF(CONFIG)
        self.sessions = SessionSignals(CONFIG)
        self.sync = ItemSync(self.model, name, self.sessions)

    def learn(self, users: list[str], items: list[str], ts: np.ndarray) -> None:
        user_rows, item_rows = self.model.users.rows(users), self.model.items.rows(items)
        self.sessions.update(user_rows, item_rows, ts)
        self.model.learn_rows(user_rows, item_rows, np.full(len(users), np.nan, np.float32),
                              np.ones(len(users), np.float32))

    def signals(self) -> dict[str, np.ndarray]:
        """The item-level signals, keyed by item id (rows may differ between members)."""
        arrays = self.sessions.to_arrays(len(self.model.users), len(self.model.items))
        ids = np.array(self.model.items.ids.ids + [""])  # row -1 (a free slot) -> ""
        out = {}
        for name in ("rules", "cooc"):
            order = np.argsort(ids[:-1])
            out[f"{name}.rows"] = ids[arrays[f"{name}.rows"][order]]
            out[f"{name}.weights"] = arrays[f"{name}.weights"][order]
        lengths = arrays["ring.lengths"]
        out["ring"] = np.where(np.arange(arrays["ring.items"].shape[1]) < lengths[:, None],
                               ids[arrays["ring.items"]], "")
        return out


def _clicks(seed: int, n: int = 300, start_ms: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    users = [f"u{seed}-{u}" for u in rng.integers(0, 20, n)]
    items = [f"i{i}" for i in rng.zipf(1.4, n) % 40]
    return users, items, start_ms + np.cumsum(rng.integers(1_000, 600_000, n))


def _send(sender: Member, *receivers: Member) -> list[ItemDelta]:
    messages = sender.sync.take()
    for member in receivers:
        for message in messages:
            member.sync.apply(ItemDelta.decode(message.encode()))
    return messages


def test_a_member_learns_the_others_clicks_into_the_same_signals() -> None:
    """A member that only receives holds what the sender's own sessions taught it, exactly: the
    same kernel learns the clicks, from sessions kept apart from its users'."""
    a, b = Member("a"), Member("b")
    for round_ in range(3):
        a.learn(*_clicks(round_, start_ms=round_ * 10**9))
        messages = _send(a, b)
        assert any(m.click_sessions for m in messages)
    assert b.sync.received_clicks == a.sync.sent_clicks == 900
    mine, theirs = a.signals(), b.signals()
    assert (mine["rules.rows"] != "").sum() > 100 and (mine["ring"] != "").sum() > 50
    for name in mine:
        np.testing.assert_array_equal(theirs[name], mine[name], err_msg=name)
    assert len(b.model.users) == 0  # the clicks came without their users


def test_each_member_gets_what_the_group_learned() -> None:
    """Two members, each with users of its own: each member's rules reach pairs only the other's
    users clicked."""
    a, b = Member("a"), Member("b")
    a.learn(["ann"] * 3, ["x", "y", "z"], np.array([1_000, 2_000, 3_000]))
    b.learn(["bob"] * 2, ["p", "q"], np.array([1_500, 2_500]))
    _send(a, b)
    _send(b, a)
    for member, pairs in ((a, [("p", "q")]), (b, [("x", "y"), ("y", "z")])):
        member.sessions.learn_waiting()
        rules = member.sessions.rules
        for before, after in pairs:
            rows, weights = rules.neighbours(member.model.items.ids.get(before))
            assert member.model.items.ids.get(after) in rows.tolist()


def test_clicks_split_over_parts() -> None:
    a, b = Member("a"), Member("b")
    a.learn(*_clicks(1, n=50))
    import recstream.embeddings.sync as sync_module

    before = sync_module.CLICKS_PER_MESSAGE
    sync_module.CLICKS_PER_MESSAGE = 7
    try:
        messages = _send(a, b)
    finally:
        sync_module.CLICKS_PER_MESSAGE = before
    assert sum(len(m.click_sessions) // 8 for m in messages) == 50 and len(messages) >= 8
    assert {m.parts for m in messages} == {len(messages)} and b.sync.received_clicks == 50


def test_a_restarted_member_does_not_send_its_clicks_twice() -> None:
    """Restored from a checkpoint taken before a send, a member reads its send back and relearns
    the same input: those clicks are in the group already."""
    a, b = Member("a"), Member("b")
    a.learn(*_clicks(5))
    checkpoint = (a.sessions.to_arrays(len(a.model.users), len(a.model.items)),
                  {k: v.copy() for k, v in a.model.state_arrays().items()}, a.sync.to_arrays(), a.sync.to_meta())
    later = _clicks(6, start_ms=10**9)
    a.learn(*later)
    sent = _send(a, b)
    assert sum(len(m.click_sessions) // 8 for m in sent) == 600
    restarted = Member("a")
    sessions, model, arrays, meta = checkpoint
    restarted.model.load_state_arrays(model)
    restarted.sessions.load_arrays(sessions)
    restarted.sync.load(arrays, meta)
    for message in sent:
        restarted.sync.apply(message)  # its own, after the checkpoint
    restarted.learn(*later)
    assert all(not m.click_sessions for m in restarted.sync.take())
    restarted.learn(*_clicks(7, n=10, start_ms=2 * 10**9))
    assert sum(len(m.click_sessions) // 8 for m in restarted.sync.take()) == 10


def test_other_members_sessions_survive_a_checkpoint() -> None:
    """A session of another member that continues after this member restarts goes on, not anew."""
    a, b = Member("a"), Member("b")
    a.learn(["ann", "ann"], ["x", "y"], np.array([1_000, 2_000]))
    _send(a, b)
    restored = SessionSignals(CONFIG)
    restored.load_arrays(b.sessions.to_arrays(len(b.model.users), len(b.model.items)))
    b.sessions = restored
    b.sync.sessions = restored
    restored.share()
    a.learn(["ann"], ["z"], np.array([3_000]))
    _send(a, b)
    restored.learn_waiting()
    rows, _ = restored.rules.neighbours(b.model.items.ids.get("y"))
    assert b.model.items.ids.get("z") in rows.tolist()  # y -> z: the same session


@pytest.mark.parametrize("fields, reason", [
    ({"click_ids": ["x"], "click_sessions": b"\x01" + b"\x00" * 7, "click_items": b"\x01\x00\x00\x00",
      "click_ts": b"\x00" * 8}, "click items outside"),
    ({"click_ids": ["x"], "click_sessions": b"\x01" + b"\x00" * 7, "click_items": b"", "click_ts": b"\x00" * 8},
     "click_items has 0 bytes"),
    ({"click_ids": ["x"], "click_sessions": b"\x01" + b"\x00" * 7, "click_items": b"\x00" * 4,
      "click_ts": np.array([2**62], "<i8").tobytes()}, "click times past this member's clock"),
])
def test_bad_clicks_are_refused_with_a_reason(fields: dict, reason: str) -> None:
    data = ItemDelta("b", 1, 0, 1, 8, [], b"", b"", b"", b"", **fields).encode()
    with pytest.raises(InvalidDelta, match=reason):
        ItemDelta.decode(data)


def test_without_session_sharing_only_items_travel() -> None:
    a, b = OnlineMF(CONFIG), OnlineMF(CONFIG)
    sync_a, sync_b = ItemSync(a, "a"), ItemSync(b, "b")
    a.learn(["ann", "ann"], ["x", "y"], weights=np.ones(2, np.float32))
    messages = sync_a.take()
    assert messages and not any(m.click_sessions for m in messages)
    for message in messages:
        sync_b.apply(message)
