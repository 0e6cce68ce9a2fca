"""Index building, atomic swaps under concurrent queries, and exact ranking of changed items."""

import threading

import numpy as np
from annoy import AnnoyIndex
from recstream.embeddings.history import InteractionHistory
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.index.build import build_in_subprocess, mips_item_vectors, mips_query
from recstream.index.query import Recommender, top_k_per_row
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


def test_top_k_per_row_matches_a_full_sort():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(30, 500)).astype(np.float32)
    idx, vals = top_k_per_row(scores, 7)
    np.testing.assert_array_equal(idx, np.argsort(-scores, axis=1)[:, :7])
    np.testing.assert_array_equal(vals, -np.sort(-scores, axis=1)[:, :7])


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

    recs = Recommender(mf, None, k=5).recommend(np.array([user]), index)[0]
    assert recs.item_rows[0] == target and fresh in recs.item_rows[:2]
    exact = mf.items.vectors @ query + mf.ranking_biases()
    np.testing.assert_allclose(recs.scores, exact[recs.item_rows], rtol=1e-5)


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
    overlap = np.mean([len(set(a.item_rows) & set(b.item_rows)) / 10 for a, b in zip(exact, approx)])
    assert overlap >= 0.8
    seen = mf.items.ids.get("i1")
    assert all(seen not in r.item_rows for r in exact + approx)


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
