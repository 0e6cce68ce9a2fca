"""The session blend where recommendations are made: the Recommender and the service's published updates."""

import numpy as np
import pytest
from recstream.embeddings.model import MFConfig
from recstream.stream.config import EventsConfig
from recstream.stream.events import EventDecoder
from recstream.stream.state import RecState
from test_sessions import _sessions


def test_recommendations_rank_by_the_blend_exactly_and_leave_seen_items_out():
    from recstream.embeddings.history import InteractionHistory
    from recstream.index.query import Recommender

    events = _sessions(n_sessions=300, seed=4)
    state = RecState(MFConfig(dim=8))
    users = state.model.users.rows([s for _, s, _ in events])
    items = state.model.items.rows([x for _, _, x in events])
    ts = np.array([t for t, _, _ in events], dtype=np.int64)
    state.learn_rows(users, items, np.full(len(users), np.nan, np.float32), np.ones(len(users), np.float32), None, ts)
    history = InteractionHistory()
    history.add(users, items)
    now = int(ts.max())
    user_rows = np.unique(users)
    recommender = Recommender(state.model, history, 10, sessions=state.sessions)
    got = recommender.recommend(user_rows, None, now)
    # Both ways are exercised: lists the session candidates alone settle, and lists that needed
    # the factor top-k above the floor the candidates set.
    assert 0 < recommender.last.settled_by_session < len(user_rows)
    factor_only = Recommender(state.model, history, 10).recommend(user_rows, None, now)
    model, weight = state.model, state.model.config.session_mf_weight
    vectors = model.query_vectors(user_rows, now)
    differ = 0
    for n, (rows, blend) in enumerate(state.sessions.candidates(user_rows, now)):
        got_rows, got_scores = got.of(n)
        scores = model.items.vectors @ vectors[n] + model.ranking_biases()
        if len(rows):  # in a session: the blend; otherwise the factor model's own scores, as before
            scores = weight * scores
            scores[rows] += blend
        scores[list(history.items_of(int(user_rows[n])))] = -np.inf
        best = np.sort(scores)[::-1][:10]
        np.testing.assert_allclose(got_scores, best, rtol=1e-5, atol=1e-6)
        assert not set(got_rows.tolist()) & set(history.items_of(int(user_rows[n])))
        differ += len(rows) > 0 and got_rows.tolist() != factor_only.of(n)[0].tolist()
    assert differ > 10  # sessions still open at the end changed what they get


@pytest.mark.kafka
def test_published_updates_carry_the_session_blend(kafka_bootstrap, topics):
    import orjson

    from conftest import event, produce, read_all, running, service_config, wait_for

    # Sessions of two clicks: a{k} is always followed by a{k+1}; then a probe session clicks a7.
    messages, t = [], 1_700_000_000_000
    for s in range(400):
        k = s % 30
        messages += [event(f"p{s}", f"a{k}", ts=t), event(f"p{s}", f"a{k + 1}", ts=t + 1000)]
        t += 5000
    messages.append(event("probe", "a7", ts=t))
    produce(kafka_bootstrap, topics["input"], messages)
    # The factor model's weight 0: published scores are the session blend alone, exactly.
    config = service_config(kafka_bootstrap, topics, **{"output.top_k": 5, "model.session_mf_weight": 0.0})
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == len(messages), what="all events applied")
        wait_for(lambda: service.stats.commits > 0 and not service.offsets, what="a commit of everything")
    updates = [orjson.loads(m.value()) for m in read_all(kafka_bootstrap, topics["output"],
                                                         expect=service.stats.updates_published)]
    probe = [u for u in updates if u["user_id"] == "probe"][-1]
    assert probe["items"][0]["item_id"] == "a8"
    reference = RecState(config.model)  # the same events, learned offline
    decoder = EventDecoder(EventsConfig())
    reference.apply(decoder.decode([v for _, v in messages])[0])
    rows, blend = reference.sessions.candidates(reference.model.users.rows(["probe"]), t)[0]
    expected = dict(zip(reference.model.items.ids.ids_of(rows.tolist()), blend.tolist()))
    assert probe["items"][0]["score"] == pytest.approx(expected["a8"], rel=1e-5)
