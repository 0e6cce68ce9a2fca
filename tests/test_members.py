"""A consumer group simulated in one process (evaluation/members.py): one member is the single
process exactly; members that sync stay close to it; members that never sync fall behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
from recstream.embeddings.model import MFConfig
from recstream.evaluation import members as em
from recstream.evaluation import prequential as ev
from recstream.stream import cli

CONFIG = MFConfig(dim=8, seed=5)


def _ratings(n: int = 6000, users: int = 200, items: int = 150, seed: int = 0) -> ev.Interactions:
    """Ratings of rank 2 plus an item bias: what a member learns of an item from its own users is
    a quarter of what the group knows, so without syncing it must predict worse."""
    rng = np.random.default_rng(seed)
    tastes, traits = rng.normal(0, 1, (users, 2)), rng.normal(0, 1, (items, 2))
    item_bias = rng.normal(0, 0.8, items)
    u, i = rng.integers(0, users, n), rng.integers(0, items, n)
    raw = 3 + item_bias[i] + 0.5 * (tastes[u] * traits[i]).sum(1) + rng.normal(0, 0.3, n)
    ratings = np.clip(np.round(raw * 2) / 2, 0.5, 5).astype(np.float32)
    return ev.Interactions([f"u{x}" for x in u], [f"i{x}" for x in i], ratings, np.ones(n, np.float32),
                           np.arange(n, dtype=np.int64) * 1000)


def _clicks(n: int = 1500, seed: int = 1) -> ev.Interactions:
    """Users click within their taste group of items, so whoever learned an item's group ranks it."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, n)
    items = (users % 6) * 10 + rng.integers(0, 10, n)
    return ev.Interactions([f"u{x}" for x in users], [f"i{x}" for x in items], np.full(n, np.nan, np.float32),
                           np.ones(n, np.float32), np.arange(n, dtype=np.int64) * 60_000)


def test_users_go_to_members_by_a_stable_hash_and_all_members_get_some() -> None:
    users = [f"u{n}" for n in range(400)]
    owner = em.owners(users, 4)
    np.testing.assert_array_equal(owner, em.owners(list(users), 4))  # same in any process: blake2b, not hash()
    assert sorted(np.unique(owner).tolist()) == [0, 1, 2, 3] and np.bincount(owner).min() > 60
    with pytest.raises(ValueError, match="at least 1"):
        em.owners(users, 0)


def test_one_member_is_exactly_the_single_process() -> None:
    data = _ratings(3000)
    single = ev.prequential_explicit(data, CONFIG)
    for sync_every in (1, 7, 0):
        one = em.members_explicit(data, CONFIG, members=1, sync_every=sync_every)
        np.testing.assert_array_equal(one.curve, single.curve)
    clicks = _clicks(800)
    single = ev.prequential_implicit(clicks, CONFIG)
    one = em.members_implicit(clicks, CONFIG, members=1, sync_every=5)
    np.testing.assert_array_equal(one.curve, single.curve)
    assert {k: one.metrics[k] for k in ("hit_rate@10", "ndcg@10", "events_evaluated")} == \
           {k: single.metrics[k] for k in ("hit_rate@10", "ndcg@10", "events_evaluated")}


def test_members_that_sync_every_event_stay_close_to_one_process() -> None:
    data = _ratings()
    single = ev.prequential_explicit(data, CONFIG).metrics
    group = em.members_explicit(data, CONFIG, members=4, sync_every=1).metrics
    assert group["syncs"] == len(data) and group["sync_bytes"] > 0
    assert group["rmse"] < 1.03 * single["rmse"], (group["rmse"], single["rmse"])
    assert group["mae"] < 1.03 * single["mae"], (group["mae"], single["mae"])


def test_members_that_never_sync_predict_worse_than_members_that_do() -> None:
    data = _ratings()
    synced = em.members_explicit(data, CONFIG, members=4, sync_every=10).metrics
    alone = em.members_explicit(data, CONFIG, members=4, sync_every=0).metrics
    assert alone["syncs"] == 0 and synced["syncs"] == len(data) // 10
    assert alone["rmse"] > 1.05 * synced["rmse"], (alone["rmse"], synced["rmse"])
    # Implicit: every member ranks among the items it knows; unsynced, it has not heard of the
    # items only other members' users clicked, and misses them.
    clicks = _clicks()
    synced = em.members_implicit(clicks, CONFIG, members=4, sync_every=10).metrics
    alone = em.members_implicit(clicks, CONFIG, members=4, sync_every=0).metrics
    assert synced["events_evaluated"] == alone["events_evaluated"]  # scored on the same events
    assert alone["hit_rate@10"] < 0.95 * synced["hit_rate@10"], (alone["hit_rate@10"], synced["hit_rate@10"])


def test_eval_cli_members_writes_the_group_beside_one_process(tmp_path, capsys) -> None:
    data = _ratings(2000)
    log = tmp_path / "ratings.csv"
    log.write_text("user,item,stars\n" + "".join(
        f"{u},{i},{r}\n" for u, i, r in zip(data.user_ids, data.item_ids, data.ratings.tolist())))
    out = tmp_path / "members.json"
    args = ["eval", "--events", str(log), "--columns", "user_id=user,item_id=item,rating=stars", "--members", "3",
            "--sync-every", "never", "--json-out", str(out)]
    assert cli.main(args) == 0
    result = json.loads(out.read_text())
    assert (result["members"], result["sync_every"], result["syncs"]) == (3, 0, 0)
    assert result["baseline_name"] == "one process (--members 1)"
    assert result["baseline"]["members"] == 1 and result["rmse"] != result["baseline"]["rmse"]
    for bad in (["--members", "0"], ["--members", "2", "--sync-every", "-5"]):
        with pytest.raises(SystemExit):
            cli.main(args[:-6] + bad)
        assert bad[-2] in capsys.readouterr().err
    for protocol in ("split", "session"):  # a clear error, not a traceback or a silent single process
        assert cli.main(args[:-2] + ["--protocol", protocol]) == 2
        assert "--members evaluates the prequential protocol" in capsys.readouterr().err


def test_ranking_with_the_groups_popularity_recovers_what_per_member_rings_lose() -> None:
    """The experiment (not the service): each member's ring of recent positives holds its own
    users' clicks only; ranked with the group's counts, members without session signals (which
    are not shared either) do better than with their own counts, and one member is unchanged."""
    config = MFConfig(dim=8, seed=5, session_rules_weight=0.0, session_cooc_weight=0.0, session_knn_weight=0.0,
                      session_repeat_weight=0.0)
    clicks = _clicks()
    single = ev.prequential_implicit(clicks, config)
    np.testing.assert_array_equal(em.members_implicit(clicks, config, 1, 1, share_popularity=True).curve,
                                  single.curve)
    own = em.members_implicit(clicks, config, 4, 1).metrics["hit_rate@10"]
    shared = em.members_implicit(clicks, config, 4, 1, share_popularity=True).metrics["hit_rate@10"]
    assert shared > 1.05 * own, (shared, own)


def test_session_clicks_in_the_sync_give_each_member_the_groups_session_signals() -> None:
    """Session signals (item to item, learned from everyone's sessions) travel with the deltas
    (``sync.sessions``): synced every event, each member ranks exactly as with one set of signals
    for the whole group (the ``share_sessions`` experiment), far better than with its own alone;
    and one member is unchanged (its rows map to the group's one to one)."""
    clicks = _clicks()
    single = ev.prequential_implicit(clicks, CONFIG)
    np.testing.assert_array_equal(em.members_implicit(clicks, CONFIG, 1, 1, share_sessions=True).curve,
                                  single.curve)
    alone = em.members_implicit(clicks, CONFIG, 4, 1, sync_sessions=False).metrics["hit_rate@10"]
    synced = em.members_implicit(clicks, CONFIG, 4, 1)
    shared = em.members_implicit(clicks, CONFIG, 4, 1, share_sessions=True)
    np.testing.assert_array_equal(synced.curve, shared.curve)
    assert synced.metrics["hit_rate@10"] > 1.2 * alone, (synced.metrics["hit_rate@10"], alone)
