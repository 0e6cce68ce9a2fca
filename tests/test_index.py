"""Index building, atomic swaps under concurrent queries, and exact ranking of changed items."""

import threading

import numpy as np
from annoy import AnnoyIndex
from recstream.embeddings.history import InteractionHistory
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.index.build import build_in_subprocess, mips_item_vectors, mips_query
from recstream.index.query import Recommender
from recstream.index.refresh import IndexConfig, IndexRefresher


def _trained_model(n_users=200, n_items=400, n=20_000, seed=0):
    rng = np.random.default_rng(seed)
    mf = OnlineMF(MFConfig(dim=16, seed=seed))
    mf.learn([f"u{x}" for x in rng.integers(0, n_users, n)], [f"i{x}" for x in rng.zipf(1.3, n) % n_items])
    return mf


def test_mips_reduction_finds_the_true_inner_product_top_k(tmp_path):
    rng = np.random.default_rng(1)
    vectors = (rng.normal(size=(2000, 8)) * rng.lognormal(0, 0.5, (2000, 1))).astype(np.float32)
    biases = rng.normal(size=2000).astype(np.float32)
    path = tmp_path / "items.ann"
    build_in_subprocess(mips_item_vectors(vectors, biases), path, n_trees=20, timeout_s=120)
    index = AnnoyIndex(10, "angular")
    index.load(str(path))
    recall = []
    for user in rng.normal(size=(50, 8)).astype(np.float32):
        truth = np.argsort(-(vectors @ user + biases))[:10]
        found = index.get_nns_by_vector(mips_query(user), 10, search_k=20_000)
        recall.append(len(set(truth) & set(found)) / 10)
    assert np.mean(recall) >= 0.95


def test_swaps_are_atomic_under_concurrent_queries(tmp_path):
    mf = _trained_model()
    lock = threading.Lock()
    refresher = IndexRefresher(mf, lock, tmp_path, IndexConfig(n_trees=5))
    refresher.rebuild()
    errors, versions = [], [[], []]
    done = threading.Event()

    def query(seen_versions):
        rng = np.random.default_rng(3)
        while not done.is_set():
            index = refresher.current
            try:
                found = index.nearest(mips_query(rng.normal(size=16).astype(np.float32)), 10, -1)
                assert len(found) == 10 and max(found) < index.n_items
                seen_versions.append(index.version)
            except Exception as exc:  # pragma: no cover - the assertion below reports it
                errors.append(exc)

    readers = [threading.Thread(target=query, args=(v,)) for v in versions]
    for t in readers:
        t.start()
    for round_ in range(5):
        with lock:
            mf.learn([f"u{round_}"] * 50, [f"new{round_}-{j}" for j in range(50)])
        refresher.rebuild()
    done.set()
    for t in readers:
        t.join()
    assert errors == []
    assert refresher.current.version == 6 and refresher.current.n_items == len(mf.items)
    for seen_versions in versions:  # each reader saw whole indexes, in order, more than one of them
        assert seen_versions == sorted(seen_versions) and len(set(seen_versions)) > 1
    assert len(list(tmp_path.glob("*.ann"))) == 1  # superseded index files are removed


def test_items_changed_after_the_build_are_ranked_exactly(tmp_path):
    mf = _trained_model()
    refresher = IndexRefresher(mf, threading.Lock(), tmp_path, IndexConfig(n_trees=10))
    index = refresher.rebuild()
    user = mf.users.ids.get("u1")
    # Make one stale item and one brand-new item the best matches for u1 after the build.
    mf.learn(["u1"], ["i300"])  # records that i300 changed since the build
    mf.learn(["other"], ["brand-new"])
    target, fresh = mf.items.ids.get("i300"), mf.items.ids.get("brand-new")
    query = mf.query_vectors(np.array([user]))[0]  # long-term plus short-term interest
    direction = query / np.linalg.norm(query)
    mf.items.vectors[target] = 50 * direction
    mf.items.vectors[fresh] = 40 * direction
    mf.items.biases[[target, fresh]] = 0.0

    rows, scores = Recommender(mf, None, k=5).recommend(np.array([user]), index).of(0)
    assert rows[0] == target and fresh in rows[:2]
    exact = mf.items.vectors @ query + mf.ranking_biases()
    np.testing.assert_allclose(scores, exact[rows], rtol=1e-5)


def test_index_path_agrees_with_exact_ranking_and_excludes_seen(tmp_path):
    mf = _trained_model()
    history = InteractionHistory()
    users = mf.users.rows([f"u{x}" for x in range(20)])
    history.add(users, mf.items.rows(["i1"] * 20))
    refresher = IndexRefresher(mf, threading.Lock(), tmp_path, IndexConfig(n_trees=30))
    index = refresher.rebuild()
    recommender = Recommender(mf, history, k=10)
    exact = recommender.recommend(users, None)
    mf.learn(["u0"], ["i5"])  # a few changed items, so both the index and the exact part are used
    approx = recommender.recommend(users, index)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.item_rows.tolist(), approx.item_rows.tolist())])
    assert overlap >= 0.8
    seen = mf.items.ids.get("i1")
    assert not (exact.item_rows == seen).any() and not (approx.item_rows == seen).any()


def test_item_drift_counts_items_settled_at_both_builds(tmp_path):
    mf = OnlineMF(MFConfig(dim=8, seed=3))
    mf.learn([f"u{n % 40}" for n in range(3000)], [f"old{n % 20}" for n in range(3000)])  # 150 events each
    mf.learn([f"u{n % 40}" for n in range(40)], [f"new{n % 20}" for n in range(40)])  # 2 events each
    refresher = IndexRefresher(mf, threading.Lock(), tmp_path, IndexConfig(n_trees=2))
    refresher.rebuild()
    # New items pass 50 events between the builds: they leave their random start, which is not drift.
    mf.learn([f"u{n % 40}" for n in range(2000)], [f"new{n % 20}" for n in range(2000)])
    old = mf.items.rows([f"old{n}" for n in range(20)])
    mf.set_item_rows(old, mf.items.vectors[old].copy(), mf.items.biases[old].copy())  # old items unchanged
    refresher.rebuild()
    calm = refresher.item_drift
    # A planted change: every old item's vector turns around.
    mf.set_item_rows(old, -mf.items.vectors[old], mf.items.biases[old].copy())
    refresher.rebuild()
    assert calm < 0.05 and refresher.item_drift > 0.9, (calm, refresher.item_drift)  # half the settled items turned


def _capped_setup(tmp_path, n_items=3000):
    """A model whose catalogue is larger than the hot set, with an index built over it."""
    rng = np.random.default_rng(7)
    mf = OnlineMF(MFConfig(dim=16, seed=7, negative_pool=64))
    n = 30_000
    mf.learn([f"u{x}" for x in rng.integers(0, 300, n)], [f"i{x}" for x in rng.zipf(1.2, n) % n_items])
    mf.learn(["warm"] * 20, [f"i{x}" for x in range(n_items - 20, n_items)])  # every item exists
    refresher = IndexRefresher(mf, threading.Lock(), tmp_path, IndexConfig(n_trees=20))
    return mf, refresher.rebuild()


def test_capped_hot_set_holds_the_recently_popular_and_the_index_serves_the_tail(tmp_path):
    mf, _ = _capped_setup(tmp_path)
    users = mf.users.rows(["u1", "u2", "u3"])
    norms = np.linalg.norm(mf.items.vectors, axis=1)
    recommender = Recommender(mf, None, k=10, exact_items=200, search_k=50_000)
    hot = set(recommender.hot_items(1.0, norms, mf.ranking_biases()).tolist())
    assert len(hot) == 200 and set(mf.recently_popular().tolist()) <= hot
    # u1 gets a strong taste for one direction, and a tail item (low bias, typical norm: its
    # potential is unchanged, so it stays out of the hot set) is turned to face it.
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16).astype(np.float32)
    direction /= np.linalg.norm(direction)
    mf.users.vectors[users[0]] = 50 * direction
    candidates = [i for i in np.argsort(mf.items.biases).tolist() if i not in hot and norms[i] >= 0.5]
    tail_item = candidates[0]
    mf.items.vectors[tail_item] = norms[tail_item] * direction
    index = IndexRefresher(mf, threading.Lock(), tmp_path / "again", IndexConfig(n_trees=20)).rebuild()
    found = recommender.recommend(users, index)
    assert tail_item not in recommender.hot_items(1.0, np.linalg.norm(mf.items.vectors, axis=1), mf.ranking_biases())
    assert found.item_rows[0, 0] == tail_item and recommender.last.index_lookups >= 1
    without = recommender.recommend(users, index, use_index=False)
    assert tail_item not in without.item_rows[0]


def test_capped_recommendations_match_brute_force_and_skip_lookups_the_bound_rules_out(tmp_path):
    mf, index = _capped_setup(tmp_path)
    history = InteractionHistory()
    users = mf.users.rows([f"u{x}" for x in range(100)])
    history.add(users, mf.items.rows(["i1"] * 100))
    recommender = Recommender(mf, history, k=10, exact_items=400, search_k=50_000, max_lookups=10_000)
    top = recommender.recommend(users, index)
    scores = mf.query_vectors(users) @ mf.items.vectors.T + mf.ranking_biases()
    scores[:, mf.items.ids.get("i1")] = -np.inf
    exact = np.argsort(-scores, axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top.item_rows.tolist(), exact.tolist())])
    assert recall >= 0.97, recall
    stats = recommender.last
    assert stats.index_lookups == stats.tail_possible < len(users)  # some users needed no lookup
    np.testing.assert_allclose(top.scores, np.take_along_axis(scores, top.item_rows, axis=1), rtol=1e-4, atol=1e-5)


def test_a_slow_build_spaces_the_next_one(tmp_path):
    mf = _trained_model()
    refresher = IndexRefresher(mf, threading.Lock(), tmp_path,
                               IndexConfig(n_trees=2, rebuild_interval_s=0.01, min_rebuild_interval_s=0,
                                           max_build_share=0.25))
    built = refresher.rebuild()
    mf.learn(["u1"], ["i1"])  # something changed, and the rebuild interval has passed
    import dataclasses
    import time
    time.sleep(0.02)
    refresher.current = dataclasses.replace(built, build_seconds=3600.0)  # as if it had taken an hour
    assert not refresher.due()
    refresher.current = dataclasses.replace(built, build_seconds=0.0)
    assert refresher.due()


def test_clustered_exact_search_equals_brute_force_with_exclusions():
    from recstream.index.exact import ClusteredItems

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(20, 16)) * 2
    vectors = (centres[rng.integers(0, 20, 5000)] + 0.3 * rng.normal(size=(5000, 16))).astype(np.float32)
    biases = rng.normal(size=5000).astype(np.float32)
    rows = rng.permutation(100_000)[:5000]  # item rows of a bigger catalogue
    users = (rng.normal(size=(300, 16)) * rng.lognormal(0, 1, (300, 1))).astype(np.float32)
    scores = users @ vectors.T + biases
    # Each user has seen their true best three items and a few random ones: all must be left out.
    best = np.argsort(-scores, axis=1)[:, :3]
    seen = [np.concatenate([rows[best[u]], rng.choice(rows, 5)]) for u in range(300)]
    seen_start = np.concatenate([[0], np.cumsum([len(s) for s in seen])])
    found_rows, found_scores = ClusteredItems(vectors, biases, rows).top_k(users, seen_start, np.concatenate(seen), 10)
    column_of = {r: c for c, r in enumerate(rows.tolist())}
    for u in range(300):
        allowed = scores[u].copy()
        allowed[[column_of[r] for r in seen[u].tolist() if r in column_of]] = -np.inf
        truth = np.argsort(-allowed)[:10]
        np.testing.assert_array_equal(found_rows[u], rows[truth])
        np.testing.assert_allclose(found_scores[u], allowed[truth], rtol=1e-5, atol=1e-5)
    # A floor per user (what session candidates set): only items above it, the best of them.
    floor = np.sort(scores, axis=1)[:, -6] - np.float32(1e-3)  # about five items per user clear it
    found_rows, found_scores = ClusteredItems(vectors, biases, rows).top_k(users, seen_start, np.concatenate(seen), 10,
                                                                           floor)
    for u in range(300):
        allowed = scores[u].copy()
        allowed[[column_of[r] for r in seen[u].tolist() if r in column_of]] = -np.inf
        above = np.flatnonzero(allowed > floor[u])
        truth = above[np.argsort(-allowed[above])][:10]
        assert (found_rows[u, len(truth):] == -1).all() and len(truth) < 10
        np.testing.assert_array_equal(found_rows[u, :len(truth)], rows[truth])


def test_a_small_batch_scored_by_one_product_ranks_as_the_clustered_search(tmp_path, monkeypatch):
    from recstream.index import query

    mf, _ = _capped_setup(tmp_path)
    history = InteractionHistory()
    users = mf.users.rows([f"u{x}" for x in range(60)])
    history.add(users, mf.items.rows([f"i{x}" for x in range(60)]))
    recommender = Recommender(mf, history, k=10, exact_items=400)
    product = recommender.recommend(users, None)  # 60 x 400 scores: below the threshold
    monkeypatch.setattr(query, "_BRUTE_FORCE_SCORES", 0)
    clustered = recommender.recommend(users, None)
    np.testing.assert_array_equal(product.item_rows, clustered.item_rows)
    np.testing.assert_allclose(product.scores, clustered.scores, rtol=1e-5, atol=1e-5)


def test_the_tail_bound_never_leaves_out_a_user_whose_tail_can_win():
    """The banded bound is an upper bound: every user whose best tail score reaches their k-th hot
    score is among the users sent to the index (and it rules out some users, or it would be idle)."""
    from recstream.index.query import _NORM_BANDS, _norm_bands

    rng = np.random.default_rng(11)
    n_items, n_users = 5000, 400
    Q = (rng.normal(size=(n_items, 16)) * rng.gamma(2.0, 0.3, size=(n_items, 1))).astype(np.float32)
    biases = rng.normal(scale=0.5, size=n_items).astype(np.float32)
    X = (rng.normal(size=(n_users, 16)) * rng.gamma(2.0, 0.5, size=(n_users, 1))).astype(np.float32)
    tail = rng.random(n_items) < 0.8
    biases[~tail] += 3.0  # the hot set: the recently popular
    kth = np.quantile(X @ Q[~tail].T + biases[~tail], 0.995, axis=1).astype(np.float32)  # a k-th hot score
    top_scores = np.repeat(kth[:, None], 10, axis=1)
    item_norms = np.linalg.norm(Q, axis=1).astype(np.float32)
    recommender = Recommender(OnlineMF(MFConfig(dim=16, seed=0)), None, k=10)
    need = set(recommender._tail_possible(np.linalg.norm(X, axis=1), tail, item_norms, biases, top_scores).tolist())
    can_win = np.flatnonzero((X @ Q[tail].T + biases[tail]).max(axis=1) >= kth)
    assert set(can_win.tolist()) <= need
    # Tighter than pairing the tail's largest bias with its longest vector (what it replaced).
    loose = biases[tail].max() + np.linalg.norm(X, axis=1) * item_norms[tail].max() >= kth
    assert len(need) < loose.sum(), (len(can_win), len(need), loose.sum())
    band_norm, band_bias = _norm_bands(item_norms, biases, tail, _NORM_BANDS)
    assert band_norm.max() == item_norms[tail].max() and band_bias.max() == biases[tail].max()
