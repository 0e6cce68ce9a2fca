"""The evaluation harness: prequential means predicted before learned; metrics computed right."""

import json
import subprocess
import sys

import numpy as np
import pytest
from recstream.embeddings.model import MFConfig
from recstream.evaluation import prequential as ev


def _explicit(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 30, n)
    items = rng.integers(0, 40, n)
    user_bias, item_bias = rng.normal(0, 1.0, 30), rng.normal(0, 0.5, 40)
    raw = 3 + user_bias[users] + item_bias[items] + rng.normal(0, 0.3, n)
    ratings = np.clip(np.round(raw * 2) / 2, 0.5, 5).astype(np.float32)
    return ev.Interactions([f"u{u}" for u in users], [f"i{i}" for i in items], ratings, np.ones(n, np.float32))


def test_prequential_explicit_never_sees_the_rating_it_predicts():
    data = _explicit()
    result = ev.prequential_explicit(data, MFConfig(dim=4))
    # The first prediction is made from nothing: mean 0, clipped to the lowest rating.
    first = abs(float(data.ratings.min()) - float(data.ratings[0]))
    assert result.curve[0] == pytest.approx(first)
    # Learning helps: the last thousand are predicted far better than the first hundred.
    assert result.curve[-1000:].mean() < 0.7 * result.curve[:100].mean()
    # Same events, other batch cuts: identical predictions (the kernel is batch-invariant).
    other = ev.prequential_explicit(data, MFConfig(dim=4), batch=7)
    np.testing.assert_array_equal(result.curve, other.curve)


def test_rating_replays_train_the_factors_a_single_pass_leaves_short():
    rng = np.random.default_rng(0)
    tastes, traits = rng.normal(0, 1, (100, 4)), rng.normal(0, 1, (100, 4))  # ratings of rank 4
    users, items = rng.integers(0, 100, 10_000), rng.integers(0, 100, 10_000)
    ratings = np.clip(np.round(3 + 0.5 * (tastes[users] * traits[items]).sum(1) + rng.normal(0, 0.3, 10_000)), 1, 5)
    data = ev.Interactions([f"u{u}" for u in users], [f"i{i}" for i in items], ratings.astype(np.float32),
                           np.ones(10_000, np.float32))
    replayed = ev.prequential_explicit(data, MFConfig(dim=8)).metrics["rmse"]
    single_pass = ev.prequential_explicit(data, MFConfig(dim=8, rating_replay_steps=0)).metrics["rmse"]
    assert replayed < 0.95 * single_pass, (replayed, single_pass)  # measured 0.904 against 0.976


def test_river_baseline_runs_on_the_same_events():
    data = _explicit(800)
    result = ev.river_biasedmf(data)
    assert 0 < result.metrics["mae"] < 2 and result.metrics["rmse"] >= result.metrics["mae"]


def test_hits_exclude_seen_items_and_share_ties():
    scores = np.arange(20, 0, -1, dtype=np.float64)  # item 0 best
    none = np.array([], dtype=np.int64)
    assert ev._hit_and_gain(scores, 9, none) == (1.0, pytest.approx(1 / np.log2(11)))
    assert ev._hit_and_gain(scores, 10, none) == (0.0, 0.0)
    assert ev._hit_and_gain(scores, 10, np.array([0, 1]))[0] == 1.0  # two better ones already seen
    tied = np.array([3.0] * 4 + [1.0] * 16)  # target among 4 tied leaders: a sure hit
    assert ev._hit_and_gain(tied, 2, none)[0] == pytest.approx(1.0)
    flat = np.ones(20)  # all tied: 10 of 20 places are in the top 10
    assert ev._hit_and_gain(flat, 5, none)[0] == pytest.approx(0.5)


def test_popularity_so_far_hits_what_is_popular():
    # Everyone clicks item 0..4 in turn; with 20 items, popularity ranks those first.
    users = [f"u{n % 30}" for n in range(3000)]
    items = [f"i{(n // 30) % 5}" if n % 7 else f"i{5 + n % 15}" for n in range(3000)]
    data = ev.Interactions(users, items, np.full(3000, np.nan, np.float32), np.ones(3000, np.float32))
    pop = ev.prequential_implicit(data, MFConfig(dim=4), "popularity")
    assert pop.metrics["events_evaluated"] > 0 and 0 <= pop.metrics["hit_rate@10"] <= 1
    assert pop.metrics["ndcg@10"] <= pop.metrics["hit_rate@10"]


def test_split_holds_out_per_user_and_scores_perfect_rankings_perfectly():
    users = [f"u{n % 10}" for n in range(500)]
    items = [f"i{n // 10}" for n in range(500)]  # unique (user, item) pairs, as in Last.fm
    data = ev.Interactions(users, items, np.full(500, np.nan, np.float32), np.ones(500, np.float32))
    train, held = ev.user_split(data, 0.2, seed=1)
    assert len(train) + sum(len(v) for v in held.values()) == 500 and all(len(v) == 10 for v in held.values())
    assert all(not (set(train.item_ids[n] for n in range(len(train)) if train.user_ids[n] == u) & items_)
               for u, items_ in held.items())
    perfect = {u: sorted(v)[:10] for u, v in held.items()}
    assert ev._ranking_metrics(perfect, held)["ndcg@10"] == pytest.approx(1.0)
    assert ev._ranking_metrics({}, held)["recall@10"] == 0.0


def test_short_term_interest_recovers_faster_after_tastes_switch():
    from recstream.stream.synthetic import SyntheticClickstream

    def hit_rate_after_switch(seed: int, session: bool) -> float:
        gen = SyntheticClickstream(n_users=300, n_items=400, seed=seed, noise=0.05, events_per_second=50)
        before = gen.events(30_000)
        gen.shift_tastes(1.0)  # every user's tastes change
        after = gen.events(6_000)
        users = [f"u{u}" for u in np.concatenate([before.users, after.users]).tolist()]
        items = [f"i{i}" for i in np.concatenate([before.items, after.items]).tolist()]
        data = ev.Interactions(users, items, np.full(len(users), np.nan, np.float32), np.ones(len(users), np.float32),
                               np.concatenate([before.ts, after.ts]))
        # The generator's clicks have no order within a user's tastes, so the sequence signals
        # (transition vectors, session signals) are off in both arms: this measures the recent-items vector alone.
        config = MFConfig(dim=16, short_term_weight=3.0 if session else 0.0, transition_learning_rate=0.0,
                          session_rules_weight=0.0, session_cooc_weight=0.0, session_knn_weight=0.0,
                          session_repeat_weight=0.0)
        result = ev.prequential_implicit(data, config)
        return float(result.curve[-len(after):].mean())  # nearly every event is evaluated here

    seeds = (4, 5, 6)
    with_short = np.mean([hit_rate_after_switch(s, True) for s in seeds])
    without = np.mean([hit_rate_after_switch(s, False) for s in seeds])
    print(f"HR@10 after the switch (3 seeds): with short-term interest {with_short:.4f}, without {without:.4f}")
    assert with_short > 1.03 * without


def test_eval_cli_writes_json_and_a_plot_of_both_runs(tmp_path):
    data = _explicit(6000)
    log = tmp_path / "ratings.csv"
    log.write_text("user,item,stars\n" + "".join(
        f"{u},{i},{r}\n" for u, i, r in zip(data.user_ids, data.item_ids, data.ratings.tolist())) + "u1,i1,x\nu2,i2,x\n")
    out, plot = tmp_path / "result.json", tmp_path / "curve.png"
    result = subprocess.run([sys.executable, "-m", "recstream.stream.cli", "eval", "--events", str(log), "--mode",
                             "explicit", "--columns", "user_id=user,item_id=item,rating=stars",
                             "--json-out", str(out), "--plot", str(plot)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert written["events"] == 6000 and written["baseline"]["events"] == 6000
    assert written["rejected"] == 2 and written["rejected_reasons"] == {"rating must be a number, got str": 2}
    assert "rejected 2 lines: rating must be a number, got str (2)" in result.stdout
    assert {"mae", "rmse", "events_per_s"} <= written.keys() and {"mae", "rmse"} <= written["baseline"].keys()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
