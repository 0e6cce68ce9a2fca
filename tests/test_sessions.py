"""Session signals: exact counts, bounded memory, session boundaries, faithful kNN, checkpoints, the eval."""

import json
import random

import numpy as np
import pytest
from recstream.embeddings import session as session_module
from recstream.embeddings.item_neighbours import ItemNeighbours
from recstream.embeddings.model import MFConfig
from recstream.embeddings.session import SessionSignals
from recstream.embeddings.session_knn import RecentSessions
from recstream.evaluation.prequential import Interactions
from recstream.evaluation.session import _VSKNN, prequential_baseline, prequential_session
from recstream.stream.checkpoint import CheckpointStore
from recstream.stream.config import EventsConfig
from recstream.stream.events import EventDecoder, session_keys
from recstream.stream.state import RecState

MINUTE = 60_000


def _sessions(n_sessions=300, n_items=60, seed=0, start=0):
    """Clicks of sessions that walk a ring of items (so what follows what is learnable), interleaved in time."""
    rng = random.Random(seed)
    events = []
    for s in range(n_sessions):
        t = start + s * 20_000
        x = rng.randrange(n_items)
        for _ in range(rng.randint(2, 8)):
            events.append((t, f"s{s}", f"i{x}"))
            t += rng.randint(1_000, 60_000)
            x = (x + rng.choice((1, 1, 2, 0))) % n_items
    events.sort()
    return events


def _reference_counts(events, window):
    """Sequential rules and co-occurrence counted the slow way, per the module docstrings."""
    rules, cooc, sessions = {}, {}, {}
    for _, s, x in events:
        clicks = sessions.setdefault(s, [])
        for i in range(1, min(window, len(clicks)) + 1):
            y = clicks[-i]
            rules[(y, x)] = rules.get((y, x), 0.0) + 1.0 / i
            cooc[(y, x)] = cooc.get((y, x), 0.0) + 1.0
            if y != x:
                cooc[(x, y)] = cooc.get((x, y), 0.0) + 1.0
        clicks.append(x)
    return rules, cooc


def _stored(neighbours, items):
    out = {}
    for y in range(len(items)):
        rows, weights = neighbours.neighbours(y)
        out.update({(items[y], items[x]): w for x, w in zip(rows.tolist(), weights.tolist())})
    return out


def test_rules_and_cooccurrence_are_exact_counts_after_a_known_sequence():
    events = _sessions()
    state = RecState(MFConfig(dim=8, session_neighbours=64, session_half_life_s=0))
    users = state.model.users.rows([s for _, s, _ in events])
    items = state.model.items.rows([x for _, _, x in events])
    state.sessions.update(users, items, np.array([t for t, _, _ in events]))
    rules, cooc = _reference_counts(events, state.model.config.session_rules_window)
    names = state.model.items.ids.ids
    for stored, expected in ((_stored(state.sessions.rules, names), rules), (_stored(state.sessions.cooc, names), cooc)):
        assert stored.keys() == expected.keys()
        np.testing.assert_allclose([stored[k] for k in expected], list(expected.values()), rtol=1e-6)


def test_pair_weights_halve_every_half_life():
    pairs = ItemNeighbours(n=4, half_life_s=60.0)
    pairs.add(np.array([0, 0]), np.array([1, 2]), np.ones(2), np.array([0, 60_000]))
    rows, weights = pairs.neighbours(0)
    w = dict(zip(rows.tolist(), weights.tolist()))
    assert w[2] == pytest.approx(2 * w[1])  # the older pair counts half
    # Far beyond the rescaling point the ratios still hold and nothing overflows.
    pairs.add(np.array([0, 0]), np.array([1, 2]), np.ones(2), np.array([100 * 60_000, 101 * 60_000]))
    rows, weights = pairs.neighbours(0)
    w = dict(zip(rows.tolist(), weights.tolist()))
    assert np.isfinite(weights).all() and w[2] == pytest.approx(2 * w[1], rel=1e-4)


def test_memory_stays_bounded_per_item_under_a_flood_of_new_items():
    signals = SessionSignals(MFConfig(session_neighbours=16, session_per_item=4, session_ring=256, session_length=5))
    rng = np.random.default_rng(0)
    n = 200_000
    items = np.arange(n, dtype=np.int64)  # every click a new item ...
    items[::2] = rng.integers(0, 3, n // 2)  # ... between clicks on 3 hot items
    users = np.arange(n, dtype=np.int64) // 4  # sessions of 4 clicks
    signals.update(users, items, np.arange(n, dtype=np.int64) * 1000)
    per_item = signals.bytes_per_item()
    assert per_item == SessionSignals(signals.config).bytes_per_item()  # a constant, not a function of the stream
    assert signals.rules.rows.shape[1] == 16 and signals.ring.item_serials.shape[1] == 4
    arrays = signals.to_arrays(int(users.max()) + 1, n)
    item_bytes = sum(v.nbytes for k, v in arrays.items() if k.split(".")[0] in ("rules", "cooc")
                     or k in ("ring.item_serials", "ring.item_heads"))
    assert item_bytes <= n * per_item
    # The hot items stay each other's strongest neighbours, however many one-off items the flood
    # pushed through their rows.
    for hot in range(3):
        rows, weights = signals.cooc.neighbours(hot)
        assert set(rows[np.argsort(-weights)[:3]].tolist()) == {0, 1, 2}


def test_a_gap_or_a_new_session_id_starts_a_new_session():
    signals = SessionSignals(MFConfig())
    user = np.zeros(1, dtype=np.int64)
    signals.update(np.zeros(2, np.int64), np.array([0, 1]), np.array([0, MINUTE]))
    assert len(signals.candidates(user, 2 * MINUTE)[0][0]) > 0  # within 30 minutes: the session goes on
    assert len(signals.candidates(user, 40 * MINUTE)[0][0]) == 0  # after it: nothing left to go on
    signals.update(user, np.array([2]), np.array([40 * MINUTE]))  # a new session: no rule 1 -> 2
    assert 2 not in signals.rules.neighbours(1)[0].tolist()
    keys = session_keys(["a", "a", "b"])
    signals.update(np.ones(3, np.int64), np.array([3, 4, 5]), np.array([0, 100, 101]) * MINUTE, keys)
    assert signals.rules.neighbours(3)[0].tolist() == [4]  # the same id: a 100-minute gap did not split it
    assert len(signals.rules.neighbours(4)[0]) == 0  # a new id did, a minute later


def test_session_knn_scores_as_the_reference_vsknn_does():
    events = _sessions(n_sessions=400, n_items=40, seed=3)
    # Every neighbour scores (k past the sample), so ties in similarity cannot pick different ones.
    reference, ring = _VSKNN(k=1000, sample=50), RecentSessions(capacity=1000, length=64, per_item=512, sample=50, k=1000)
    names, rows = {}, {}
    compared = 0
    for t, s, x in events:
        item, serial = rows.setdefault(x, len(rows)), names.setdefault(s, len(names) + 1)
        session = [rows[i] for _, s2, i in events if s2 == s and _ < t]
        if session:
            expected = reference.scores(session, serial, len(rows))
            got = np.zeros(len(rows))
            ring.score(np.array(session), serial, len(rows), 64, got)
            if expected.max() > 0:  # the same neighbours, the same ranking: equal up to a per-session scale
                np.testing.assert_allclose(got / got.max(), expected / expected.max(), rtol=1e-9, atol=1e-12)
                compared += 1
        reference.learn(session, serial, item, t)
        ring.add(serial, item, t)
    assert compared > 300


def test_checkpoint_keeps_the_session_signals_and_batching_does_not_matter(tmp_path):
    events = _sessions(seed=5)
    decoder = EventDecoder(EventsConfig())
    messages = [json.dumps({"user_id": s, "item_id": x, "ts": t}).encode() for t, s, x in events]
    batch, bad = decoder.decode(messages)
    assert not bad
    config = MFConfig(dim=8)
    whole = RecState(config)
    whole.apply(batch)
    halves = RecState(config)
    half = len(messages) // 2
    halves.apply(decoder.decode(messages[:half])[0])
    halves.save(CheckpointStore(tmp_path))
    resumed = RecState.restore(CheckpointStore(tmp_path).load_latest(), config)
    resumed.apply(decoder.decode(messages[half:])[0])
    # Big batches learn the sessions on a worker thread beside the model, small ones inline.
    assert half >= session_module._BACKGROUND_MIN_EVENTS
    small = RecState(config)
    for start in range(0, len(messages), 100):
        small.apply(decoder.decode(messages[start:start + 100])[0])
    n_users, n_items = len(whole.model.users), len(whole.model.items)
    for other in (resumed, small):
        for (name, a), (_, b) in zip(sorted(whole.sessions.to_arrays(n_users, n_items).items()),
                                     sorted(other.sessions.to_arrays(n_users, n_items).items())):
            np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(whole.model.items.vectors, other.model.items.vectors)
    users = np.arange(n_users)
    for (ra, sa), (rb, sb) in zip(whole.sessions.candidates(users), resumed.sessions.candidates(users)):
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(sa, sb)


def test_events_carry_a_session_id_and_a_bad_one_is_named():
    decoder = EventDecoder(EventsConfig())
    batch, bad = decoder.decode([b'{"user_id": "u", "item_id": "i", "session_id": "s1"}',
                                 b'{"user_id": "u", "item_id": "i", "session_id": 7}',
                                 b'{"user_id": "u", "item_id": "i", "session_id": [1]}',
                                 b'{"user_id": "u", "item_id": "i"}'])
    assert batch.session_keys.tolist() == [*session_keys(["s1", "7"]).tolist(), 0]
    assert bad == [(2, "session_id must be a string or an integer, got list")]
    assert decoder.decode([b'{"user_id": "u", "item_id": "i"}'])[0].session_keys is None


def _interactions(events):
    return Interactions([s for _, s, _ in events], [x for _, _, x in events], np.full(len(events), np.nan, np.float32),
                        np.ones(len(events), np.float32), np.array([t for t, _, _ in events], dtype=np.int64))


def test_session_protocol_counts_the_same_clicks_for_every_method_and_learns_sequences():
    data = _interactions(_sessions(n_sessions=600, seed=1))
    ours = prequential_session(data, MFConfig(dim=8)).metrics
    popularity = prequential_baseline(data, "popularity").metrics
    sr = prequential_baseline(data, "sr").metrics
    for other in (popularity, sr):
        assert other["events_evaluated"] == ours["events_evaluated"] > 1000
        assert other["events_evaluated_new"] == ours["events_evaluated_new"] > 500
    # Sessions walk a ring of items: what follows what is learnable; popularity cannot know it.
    assert sr["hr@20_new"] > 1.5 * popularity["hr@20_new"]
    assert ours["hr@20_new"] > 1.5 * popularity["hr@20_new"] and ours["mrr@20"] > popularity["mrr@20"]


def test_eval_cli_session_protocol_writes_every_method(tmp_path):
    from recstream.stream.cli import main

    log = tmp_path / "clicks.tsv"
    log.write_text("SessionId\tItemId\tTime\n" + "".join(f"{s}\t{x}\t{t / 1000}\n" for t, s, x in
                                                          _sessions(n_sessions=150, seed=2)))
    out = tmp_path / "out.json"
    assert main(["eval", "--events", str(log), "--delimiter", "tab", "--columns",
                 "user_id=SessionId,item_id=ItemId,ts=Time", "--ts-unit", "s", "--order", "time", "--mode",
                 "implicit", "--protocol", "session", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    keys = {"hr@20", "mrr@20", "hr@20_new", "mrr@20_new", "events_evaluated", "events_evaluated_new"}
    assert keys <= set(result) and set(result["baselines"]) == {"popularity", "sr", "vsknn"}
    assert all(keys <= set(b) for b in result["baselines"].values())
    assert 0 < result["hr@20"] <= 1 and result["events_evaluated"] == result["baselines"]["sr"]["events_evaluated"]



def test_the_repeat_signal_weighs_as_much_as_sessions_re_view():
    n = 20_000
    users, ts = np.arange(n) // 4, np.arange(n) * 1000
    never = SessionSignals(MFConfig())
    never.update(users, np.arange(n) % 50, ts)  # four different items per session
    always = SessionSignals(MFConfig())
    always.update(users, users % 50, ts)  # one item four times per session
    assert never.repeats[0] / never.repeats[1] < 0.01 < 0.99 < always.repeats[0] / always.repeats[1]
    # A session that clicked 7 then 8: the re-view of 8 tops the list only where sessions re-view.
    for signals, repeat_first in ((never, False), (always, True)):
        signals.update(np.array([10**6, 10**6]), np.array([7, 8]), np.array([ts[-1], ts[-1] + 1000]))
        rows, scores = signals.candidates(np.array([10**6]))[0]
        assert (rows[np.argmax(scores)] == 8) == repeat_first


def test_session_settings_are_range_checked():
    from recstream.stream.config import ConfigError, load_config

    for key, value in (("model.session_length", 0), ("model.session_knn_weight", -1.0), ("model.session_gap_s", -5)):
        with pytest.raises(ConfigError, match=key):
            load_config(None, {key: value})
    assert load_config(None, {"model.session_mf_weight": 0.1}).model.session_mf_weight == 0.1


@pytest.mark.parametrize("rows_per_user", [64, 1])
def test_candidates_of_many_users_at_once_equal_each_users_alone(rows_per_user, monkeypatch):
    """A round's users are scored in chunks, by as many threads as numba runs, each with its own
    work arrays; the result must not depend on the cut, nor on buffers grown mid-way (1 row per user
    to begin with makes them grow)."""
    monkeypatch.setattr(session_module, "_ROWS_PER_USER", rows_per_user)
    signals = SessionSignals(MFConfig(session_half_life_s=0))
    events = _sessions(n_sessions=3000, n_items=400, seed=7)
    ids = {s: n for n, s in enumerate(dict.fromkeys(s for _, s, _ in events))}
    signals.update(np.array([ids[s] for _, s, _ in events]), np.array([int(x[1:]) for _, _, x in events]),
                   np.array([t for t, _, _ in events]))
    users = np.arange(len(ids))[::-1].copy()  # not in row order
    start, rows, scores = signals.candidates_csr(users)
    assert np.diff(start).sum() > 0 and len(users) >= 4 * 256  # several threads' worth, where there are cores
    for n, user in enumerate(users.tolist()):
        alone_start, alone_rows, alone_scores = signals.candidates_csr(np.array([user]))
        np.testing.assert_array_equal(rows[start[n]:start[n + 1]], alone_rows)
        np.testing.assert_array_equal(scores[start[n]:start[n + 1]], alone_scores)
