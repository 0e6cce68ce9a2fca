"""The SGD step, determinism and id handling of the embeddings package."""

import numpy as np
import pytest
from recstream.embeddings.ids import IdMap
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.embeddings.table import EmbeddingTable


def _state(mf: OnlineMF):
    return mf.users.vectors.copy(), mf.items.vectors.copy(), mf.users.biases.copy(), mf.items.biases.copy()


def test_explicit_step_matches_hand_computed_update():
    cfg = MFConfig(dim=3, learning_rate=0.1, new_item_learning_rate=0.1, bias_learning_rate=0.1, bias_prior_events=1e9,
                   regularization=0.01, seed=5, user_init_std=0.1,  # a random user vector: every term of the step shows
                   rating_replay_steps=0)  # replays: see the next test
    mf = OnlineMF(cfg)
    mf.users.rows(["u"]), mf.items.rows(["i"])
    p, q, bu, bi = (a.astype(np.float64) for a in _state(mf))
    p, q, bu, bi = p[0], q[0], bu[0], bi[0]
    rating = 4.0
    mu = rating  # the running mean after the first rating is that rating
    err = rating - (mu + bu + bi + p @ q)
    lr, reg = 0.1, 0.01
    want_p = p + lr * (err * q - reg * p)
    want_q = q + lr * (err * p - reg * q)
    want_bu, want_bi = bu + lr * (err - reg * bu), bi + lr * (err - reg * bi)

    mf.learn(["u"], ["i"], ratings=np.array([rating], dtype=np.float32))

    np.testing.assert_allclose(mf.users.vectors[0], want_p, rtol=1e-6)
    np.testing.assert_allclose(mf.items.vectors[0], want_q, rtol=1e-6)
    assert mf.users.biases[0] == pytest.approx(want_bu, rel=1e-6)
    assert mf.items.biases[0] == pytest.approx(want_bi, rel=1e-6)
    assert mf.global_mean == rating


def test_rating_replays_step_item_vectors_only_by_hand_computed_updates():
    cfg = MFConfig(dim=3, learning_rate=0.1, new_item_learning_rate=0.1, bias_learning_rate=0.1, bias_prior_events=1e9,
                   regularization=0.01, seed=5, user_init_std=0.1, rating_scale_learning_rate=0.08,
                   rating_scale_regularization=0.03, popularity_taste_learning_rate=0.01,
                   popularity_taste_regularization=0.05, rating_replay_steps=3, rating_replay_pool=1,
                   rating_replay_learning_rate=0.2, rating_replay_regularization=0.5)
    mf = OnlineMF(cfg)
    mf.users.rows(["u"]), mf.items.rows(["i"])
    arrays = {k: np.array(v) for k, v in mf.state_arrays().items()}
    arrays["user_scale"][0], arrays["popularity_taste"][0] = 1.5, 0.3  # a user who already has both
    mf.load_state_arrays(arrays)
    p, q, bu, bi = (a.astype(np.float64)[0] for a in _state(mf))
    rating = 4.0
    mu = rating  # the running mean after the first rating is that rating
    item_part = bi + p @ q
    err = rating - (mu + bu + 0.3 * (np.log1p(0) - 2.0) + 1.5 * item_part)
    taste = 0.3 + 0.01 * (err * (np.log1p(0) - 2.0) - 0.05 * 0.3)
    g = err * 1.5  # the item part reaches the rating through the scale
    p, q = p + 0.1 * (g * q - 0.01 * p), q + 0.1 * (g * p - 0.01 * q)
    bu, bi = bu + 0.1 * (err - 0.01 * bu), bi + 0.1 * (g - 0.01 * bi)
    scale = 1.5 + 0.08 * (err * item_part - 0.03 * 0.5)
    for _ in range(3):  # a ring of one rating: every replay draws it, with the item's count now 1
        g = (rating - (mu + bu + taste * (np.log1p(1) - 2.0) + scale * (bi + p @ q))) * scale
        q = q + 0.2 * (g * p - 0.5 * q)

    mf.learn(["u"], ["i"], ratings=np.array([rating], dtype=np.float32))

    assert mf.state_arrays()["user_scale"][0] == pytest.approx(scale, rel=1e-6)
    assert mf.state_arrays()["popularity_taste"][0] == pytest.approx(taste, rel=1e-5)
    np.testing.assert_allclose(mf.items.vectors[0], q, rtol=1e-5)
    np.testing.assert_allclose(mf.users.vectors[0], p, rtol=1e-6)  # replays leave users and biases alone
    assert mf.users.biases[0] == pytest.approx(bu, rel=1e-6) and mf.items.biases[0] == pytest.approx(bi, rel=1e-6)


def test_each_rating_is_replayed_steps_times_on_average_also_while_the_ring_fills():
    def events_replaying_the_first_rating(seed):
        mf = OnlineMF(MFConfig(dim=4, rating_replay_steps=4, rating_replay_pool=200, user_init_std=0.1, seed=seed))
        mf.learn(["first"], ["x"], ratings=np.array([5.0], np.float32))
        replayed = 0
        for n in range(199):  # other users rate other items: x moves only when its rating is replayed
            version = mf.model_version
            mf.learn([f"u{n}"], [f"i{n}"], ratings=np.array([3.0], np.float32))
            replayed += mf.items.ids.get("x") in mf.items_changed_since(version).tolist()
        return replayed

    # Over its stay in a ring of 200 the first rating is drawn 4 times on average (measured: 3.75
    # events over 20 seeds); drawn over the filled part only, 4 * H(200), about 23 (15.75 events).
    mean = np.mean([events_replaying_the_first_rating(seed) for seed in range(10)])
    assert 2 <= mean <= 7, mean


def test_rating_replays_move_only_items_of_recent_ratings_and_mark_them_changed():
    mf = OnlineMF(MFConfig(dim=4, rating_replay_pool=20, user_init_std=0.1))
    rng = np.random.default_rng(0)
    mf.learn([f"u{n % 9}" for n in range(200)], [f"i{n % 40}" for n in range(200)],
             ratings=rng.uniform(1, 5, 200).astype(np.float32))
    recent = {f"i{n % 40}" for n in range(181, 200)}  # the ring holds the last 20 ratings, 19 of them before this one
    users, items = mf.users.vectors.copy(), mf.items.vectors.copy()
    version = mf.model_version
    mf.learn(["u0"], ["i0"], ratings=np.array([3.0], np.float32))

    changed = {mf.items.ids.ids[r] for r in mf.items_changed_since(version)}
    moved = {mf.items.ids.ids[r] for r in np.flatnonzero((mf.items.vectors != items).any(axis=1))}
    assert moved == changed and moved - {"i0"} and moved <= recent | {"i0"}, (moved, changed)
    others = np.arange(len(mf.users)) != mf.users.ids.get("u0")
    np.testing.assert_array_equal(mf.users.vectors[others], users[others])


def test_implicit_step_matches_hand_computed_update():
    # A new item (no events yet) steps by new_item_learning_rate, its user by learning_rate.
    cfg = MFConfig(dim=4, learning_rate=0.05, new_item_learning_rate=0.3, regularization=0.0, n_negatives=3, seed=9,
                   user_init_std=0.1)
    mf = OnlineMF(cfg)
    mf.users.rows(["u"]), mf.items.rows(["i"])
    p, q, _, bi = (a.astype(np.float64)[0] for a in _state(mf))
    weight = 2.0
    relative = 1.0  # weights count relative to their running mean, which is 2.0 after this event
    g = relative * (1.0 - 1.0 / (1.0 + np.exp(-(bi + p @ q))))
    want_p, want_q, want_bi = p + 0.05 * g * q, q + 0.3 * g * p, bi + 0.3 * g

    # The negative pool is empty before the first event, so this step has no negatives.
    mf.learn(["u"], ["i"], weights=np.array([weight], dtype=np.float32))

    np.testing.assert_allclose(mf.users.vectors[0], want_p, rtol=1e-6)
    np.testing.assert_allclose(mf.items.vectors[0], want_q, rtol=1e-6)
    assert mf.items.biases[0] == pytest.approx(want_bi, rel=1e-6)


def test_implicit_weights_count_relative_to_their_mean():
    users, items, _, weights = _stream(2000)
    nan = np.full(len(users), np.nan, np.float32)

    def learned(w):
        mf = OnlineMF(MFConfig(dim=8))
        mf.learn(users, items, nan, w)
        return mf.items.vectors.copy()

    np.testing.assert_allclose(learned(weights), learned(10 * weights), rtol=1e-4, atol=1e-6)
    assert not np.allclose(learned(weights), learned(np.ones_like(weights)), atol=1e-3)


def test_ranking_bias_counts_recent_positives_and_marks_items_leaving_the_pool():
    mf = OnlineMF(MFConfig(dim=4, negative_pool=4, n_negatives=0))
    mf.learn(["u"] * 3, ["a", "a", "b"])
    a, b = mf.items.ids.get("a"), mf.items.ids.get("b")
    def pool_term(rows):
        return mf.ranking_biases(np.array(rows)) - mf.items.biases[rows]

    np.testing.assert_allclose(pool_term([a, b]), np.log1p([2.0, 1.0]), rtol=1e-6)
    version = mf.model_version
    mf.learn(["u"] * 2, ["c", "c"])  # the pool holds 4: the first "a" leaves it
    assert pool_term([a])[0] == pytest.approx(np.log1p(1.0))
    assert a in mf.items_changed_since(version).tolist()
    assert b not in mf.items_changed_since(version).tolist()


def _stream(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    users = [f"u{x}" for x in rng.integers(0, 300, n)]
    items = [f"i{x}" for x in rng.zipf(1.5, n) % 500]
    ratings = np.where(rng.random(n) < 0.5, rng.integers(1, 11, n) / 2, np.nan).astype(np.float32)
    weights = rng.choice([0.5, 1.0, 3.0], n).astype(np.float32)
    return users, items, ratings, weights


def test_same_events_same_state_however_batched():
    users, items, ratings, weights = _stream()
    whole = OnlineMF(MFConfig(dim=8, seed=3))
    whole.learn(users, items, ratings, weights)
    pieces = OnlineMF(MFConfig(dim=8, seed=3))
    for a, b in [(0, 1), (1, 777), (777, 2000), (2000, 5000)]:
        pieces.learn(users[a:b], items[a:b], ratings[a:b], weights[a:b])
    for x, y in zip(_state(whole), _state(pieces)):
        np.testing.assert_array_equal(x, y)
    assert whole.global_mean == pieces.global_mean
    other_seed = OnlineMF(MFConfig(dim=8, seed=4))
    other_seed.learn(users, items, ratings, weights)
    assert not np.array_equal(whole.users.vectors, other_seed.users.vectors)


def test_same_timed_events_same_state_however_batched():
    # With times, the short-term vectors, transitions and fading all take part.
    users, items, ratings, weights = _stream()
    stamps = 1_700_000_000_000 + np.sort(np.random.default_rng(1).integers(0, 3_600_000, len(users)))

    def learned(cuts):
        mf = OnlineMF(MFConfig(dim=8, seed=3))
        for a, b in zip(cuts[:-1], cuts[1:]):
            mf.learn_rows(mf.users.rows(users[a:b]), mf.items.rows(items[a:b]), ratings[a:b], weights[a:b],
                          None, stamps[a:b])
        return mf.state_arrays()

    whole, pieces = learned([0, 5000]), learned([0, 1, 777, 2000, 5000])
    assert whole["short_vectors"].any() and whole["transition_vectors"].any()
    for key in whole:
        if key != "counters" and key != "item_seq":  # model versions count calls
            np.testing.assert_array_equal(whole[key], pieces[key], err_msg=key)


def test_a_restored_state_continues_exactly_with_ratings_wrapping_the_replay_ring():
    users, items, ratings, weights = _stream()
    cfg = MFConfig(dim=8, seed=3, rating_replay_pool=100)  # about 2,500 ratings: the ring wraps
    whole = OnlineMF(cfg)
    whole.learn(users[:2500], items[:2500], ratings[:2500], weights[:2500])
    whole.learn(users[2500:], items[2500:], ratings[2500:], weights[2500:])
    first = OnlineMF(cfg)
    first.learn(users[:2500], items[:2500], ratings[:2500], weights[:2500])
    resumed = OnlineMF(cfg)
    resumed.load_state_arrays({k: np.array(v) for k, v in first.state_arrays().items()})
    resumed.learn(users[2500:], items[2500:], ratings[2500:], weights[2500:])
    for (name, x), (_, y) in zip(sorted(whole.state_arrays().items()), sorted(resumed.state_arrays().items())):
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert whole.state_arrays()["rating_replay.state"][1] == 100


def test_a_changed_replay_pool_keeps_the_newest_ratings_exactly():
    mf = OnlineMF(MFConfig(dim=4, rating_replay_pool=10))
    half_stars = (np.arange(25) % 10 + 1) / 2  # 0.5 ... 5.0
    mf.learn([f"u{n % 3}" for n in range(25)], [f"i{n}" for n in range(25)], ratings=half_stars.astype(np.float32))
    stored = {k: np.array(v) for k, v in mf.state_arrays().items()}
    for pool, kept in ((4, 4), (16, 10)):
        resized = OnlineMF(MFConfig(dim=4, rating_replay_pool=pool))
        resized.load_state_arrays(stored)
        ring = resized.state_arrays()
        assert ring["rating_replay.state"].tolist() == [kept % pool, kept]
        np.testing.assert_array_equal(ring["rating_replay.ratings"][:kept], half_stars[-kept:])
        assert [resized.items.ids.ids[r] for r in ring["rating_replay.items"][:kept]] == [
            f"i{n}" for n in range(25 - kept, 25)]


def test_changed_items_are_tracked_per_model_version():
    mf = OnlineMF(MFConfig(dim=4, n_negatives=0))
    mf.learn(["u1", "u2"], ["a", "b"])
    version = mf.model_version
    mf.learn(["u1"], ["c"])
    assert [mf.items.ids.id_of(r) for r in mf.items_changed_since(version)] == ["c"]
    assert len(mf.items_changed_since(mf.model_version)) == 0


def test_id_map_is_collisionless_and_canonical():
    ids = IdMap()
    rows = ids.rows([str(x) for x in range(100_000)])
    assert len(set(rows.tolist())) == 100_000
    assert ids.rows(["7", 7]).tolist() == [7, 7]
    assert ids.get(99_999) == 99_999 and ids.get("nope") is None


def test_table_growth_keeps_rows_and_init_is_order_independent():
    a = EmbeddingTable(dim=6, init_std=0.1, seed=11, capacity=2)
    a.rows(["x", "y"])
    before = a.vectors.copy()
    a.rows([f"n{i}" for i in range(1000)])
    np.testing.assert_array_equal(a.vectors[:2], before)
    b = EmbeddingTable(dim=6, init_std=0.1, seed=11)
    b.rows(["n5", "y"])
    np.testing.assert_array_equal(b.vectors[1], a.vectors[a.ids.get("y")])
    assert abs(float(a.vectors.std()) - 0.1) < 0.01


def test_a_state_from_before_weight_means_user_counts_and_scales_with_a_resized_pool_loads_and_learns():
    mf = OnlineMF(MFConfig(dim=4, negative_pool=16))
    mf.learn([f"u{n % 7}" for n in range(100)], [f"i{n % 23}" for n in range(100)])
    old = {k: np.array(v) for k, v in mf.state_arrays().items()}
    old["mean_state"] = old["mean_state"][:2]  # written before the weight mean existed
    del old["user_events"], old["user_scale"], old["popularity_taste"]
    for key in [k for k in old if k.startswith("rating_replay.")]:  # written before rating replays
        del old[key]
    newest = old["negative_pool"][np.r_[old["negative_pool_state"][0]:16, 0:old["negative_pool_state"][0]]]

    bigger = OnlineMF(MFConfig(dim=4, negative_pool=32))
    bigger.load_state_arrays(old)
    assert bigger.state_arrays()["negative_pool_state"].tolist() == [16, 16]
    pool_terms = bigger.ranking_biases() - bigger.items.biases
    np.testing.assert_allclose(pool_terms, np.log1p(np.bincount(newest, minlength=len(bigger.items))), rtol=1e-6)
    bigger.learn(["u1", "new-user"], ["i1", "new-item"])
    assert np.isfinite(bigger.items.vectors).all() and bigger.events_applied == 102
    assert bigger.state_arrays()["rating_replay.state"].tolist() == [0, 0]
    bigger.learn(["u1"], ["i2"], ratings=np.array([4.0], np.float32))
    assert bigger.state_arrays()["rating_replay.state"].tolist() == [1, 1]

    smaller = OnlineMF(MFConfig(dim=4, negative_pool=8))
    smaller.load_state_arrays(old)
    assert smaller.state_arrays()["negative_pool"].tolist() == newest[-8:].tolist()


def test_user_and_item_starts_are_set_apart():
    mf = OnlineMF(MFConfig(dim=4, user_init_std=0.0))
    mf.users.rows(["u"]), mf.items.rows(["i"])
    assert not mf.users.vectors.any() and mf.items.vectors.any()


def test_a_new_bias_is_the_running_mean_of_its_residuals_until_the_floor():
    cfg = MFConfig(dim=2, init_std=0.0, user_init_std=0.0, regularization=0.0, bias_learning_rate=0.01,
                   bias_prior_events=5, popularity_taste_learning_rate=0.0)
    mf = OnlineMF(cfg)  # no factors: predictions are mu + b_u + b_i
    mf.learn(["a"], ["x"], ratings=np.array([4.0], np.float32))  # mu = 4, nothing to explain
    mf.learn(["b", "b"], ["y", "z"], ratings=np.array([2.0, 2.0], np.float32))
    b = mf.users.ids.get("b")
    first = 2.0 - 3.0  # mu is 3 after the second rating
    bu = first / 5.0  # 1 / (0 earlier events + 5)
    second = 2.0 - (8.0 / 3.0 + bu + 0.0)  # z is a new item: its bias is 0
    bu += second / 6.0
    assert mf.users.biases[b] == pytest.approx(bu, rel=1e-5)


def test_events_without_a_time_leave_short_term_interest_and_sequence_alone():
    mf = OnlineMF(MFConfig(dim=4))
    mf.learn_rows(mf.users.rows(["u"]), mf.items.rows(["a"]), np.full(1, np.nan, np.float32),
                  np.ones(1, np.float32), None, np.array([1_000], np.int64))
    arrays = mf.state_arrays()
    short, last = arrays["short_vectors"].copy(), arrays["last_item"].copy()
    mf.learn_rows(mf.users.rows(["u"] * 3), mf.items.rows(["b", "c", "d"]), np.full(3, np.nan, np.float32),
                  np.ones(3, np.float32), None, np.zeros(3, np.int64))
    np.testing.assert_array_equal(mf.state_arrays()["short_vectors"], short)
    np.testing.assert_array_equal(mf.state_arrays()["last_item"], last)
    assert not mf.state_arrays()["transition_vectors"].any()


def test_each_user_learns_how_widely_they_use_the_rating_scale():
    mf = OnlineMF(MFConfig(dim=2, init_std=0.0, user_init_std=0.0))  # biases and scales only
    items = [f"good{n}" for n in range(5)] + [f"bad{n}" for n in range(5)]
    for user in range(30):  # most users: good items 4, bad items 2
        mf.learn([f"u{user}"] * 10, items, ratings=np.array([4.0] * 5 + [2.0] * 5, np.float32))
    for user, good, bad in (("wide", 5.0, 1.0), ("narrow", 3.5, 2.5)):
        for _ in range(5):
            mf.learn([user] * 10, items, ratings=np.array([good] * 5 + [bad] * 5, np.float32))
    scale = mf.state_arrays()["user_scale"]
    wide, narrow = scale[mf.users.ids.get("wide")], scale[mf.users.ids.get("narrow")]
    assert wide > 1.3 and narrow < 0.8, (wide, narrow)

    def spread(user):
        return mf.predict_rating(user, "good0") - mf.predict_rating(user, "bad0")

    assert spread("wide") > spread("u0") > spread("narrow")


def test_each_user_learns_whether_they_rate_well_known_items_higher():
    mf = OnlineMF(MFConfig(dim=2, init_std=0.0, user_init_std=0.0, rating_scale_learning_rate=0.0))  # biases and taste only
    famous, obscure = [f"famous{n}" for n in range(20)], [f"obscure{n}" for n in range(20)]
    mf.learn([f"fan{n % 50}" for n in range(4000)], [famous[n % 20] for n in range(4000)])  # 200 clicks each
    # Each item is rated as high by one user as it is low by the other, and both users' means are
    # the same: only a taste for well-known (or obscure) items explains their ratings.
    for _ in range(3):
        for user, high, low in (("mainstream", famous, obscure), ("connoisseur", obscure, famous)):
            mf.learn([user] * 40, high + low, ratings=np.array([4.5] * 20 + [2.5] * 20, np.float32))
    taste = mf.state_arrays()["popularity_taste"]
    assert taste[mf.users.ids.get("mainstream")] > 0.05 > -0.05 > taste[mf.users.ids.get("connoisseur")], taste
