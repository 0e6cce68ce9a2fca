"""Learning quality, measured the way a stream is served: prequentially, and on a held-out split.

- Explicit, prequential: every rating is predicted by the state before it
  (the kernel reports that prediction), then learned. MAE and RMSE, with
  predictions clipped to the data's rating range.
- Implicit, prequential: for every event, is the item in the user's top-10
  among the items they have not interacted with yet? Ranked with the state
  before the event, then learned, one event at a time (ranking a mini-batch
  with stale state misses a session's burst of clicks badly: on MovieLens,
  64-event mini-batches cut popularity's HR@10 from 0.13 to 0.08). HR@10,
  NDCG@10, recall@10 (one relevant item per event, so recall@10 = HR@10).
- Implicit, split (backfill): learn a per-user seeded 80% of the
  interactions for some epochs, then rank all items for each user against
  the held-out 20%. NDCG@10, recall@10, HR@10.

Baselines run in the same invocation on the same events: river's
``reco.BiasedMF`` (explicit), popularity-so-far (implicit; river has no
implicit recommender), and ``implicit``'s ALS (split, when installed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from recstream.embeddings.history import InteractionHistory
from recstream.embeddings.model import MFConfig, OnlineMF, epoch_rate_scale

if TYPE_CHECKING:
    from recstream.evaluation.members import MemberStates

K = 10


@dataclass
class Interactions:
    """An event log as arrays, in log order."""

    user_ids: list[str]
    item_ids: list[str]
    ratings: np.ndarray  # float32, NaN = implicit
    weights: np.ndarray  # float32
    timestamps: np.ndarray | None = None  # int64 epoch ms, if the log has them

    def __post_init__(self) -> None:
        if self.timestamps is None:
            self.timestamps = np.zeros(len(self.user_ids), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    curve: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-event loss or hit, for plots

    def as_dict(self) -> dict[str, float]:
        return dict(self.metrics)


def _rows(ids: list[str]) -> tuple[np.ndarray, int]:
    """Dense rows in order of first appearance (the same rows the model assigns)."""
    row_of: dict[str, int] = {}
    rows = np.fromiter((row_of.setdefault(x, len(row_of)) for x in ids), dtype=np.int64, count=len(ids))
    return rows, len(row_of)


# -- explicit -----------------------------------------------------------------------------------

def explicit_result(data: Interactions, predictions: np.ndarray, seconds: float) -> EvalResult:
    """MAE and RMSE of ``predictions`` (one per event, made before learning it), clipped to the
    log's rating range: a prediction outside it is never better than its nearest end."""
    low, high = float(np.nanmin(data.ratings)), float(np.nanmax(data.ratings))
    errors = np.clip(predictions, low, high) - data.ratings
    return EvalResult({"events": len(data), "events_per_s": len(data) / seconds,
                       "mae": float(np.abs(errors).mean()), "rmse": float(np.sqrt((errors ** 2).mean()))},
                      np.abs(errors))


def prequential_explicit(data: Interactions, config: MFConfig, batch: int = 10_000) -> EvalResult:
    """MAE/RMSE of predict-then-learn over the log, through ``OnlineMF.learn_rows``."""
    model = OnlineMF(config)
    predictions = np.empty(len(data), dtype=np.float64)
    started = time.perf_counter()
    for s in range(0, len(data), batch):
        e = min(s + batch, len(data))
        users = model.users.rows(data.user_ids[s:e])
        items = model.items.rows(data.item_ids[s:e])
        model.learn_rows(users, items, data.ratings[s:e], data.weights[s:e], predictions[s:e], data.timestamps[s:e])
    return explicit_result(data, predictions, time.perf_counter() - started)


def river_biasedmf(data: Interactions) -> EvalResult:
    """river's documented MovieLens set-up, prequential, with the same clipping."""
    from river import optim, reco

    model = reco.BiasedMF(n_factors=10, bias_optimizer=optim.SGD(0.025), latent_optimizer=optim.SGD(0.05),
                          weight_initializer=optim.initializers.Zeros(),
                          latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=73),
                          l2_bias=0.0, l2_latent=0.0)
    predictions = np.empty(len(data))
    ratings = data.ratings.tolist()
    started = time.perf_counter()
    for n, (u, i, y) in enumerate(zip(data.user_ids, data.item_ids, ratings)):
        predictions[n] = model.predict_one(u, i)
        model.learn_one(u, i, y)
    return explicit_result(data, predictions, time.perf_counter() - started)


# -- implicit, prequential ----------------------------------------------------------------------

def _hit_and_gain(scores: np.ndarray, target: int, seen: np.ndarray) -> tuple[float, float]:
    """Expected hit@10 and NDCG@10 of ``target`` among the columns not in ``seen``.

    Ties are broken at random (in expectation): with ``g`` items scoring higher and
    ``t`` others tied, the target is equally likely at any rank in ``g..g+t``.
    Popularity counts tie a lot; counting ties as wins would flatter it.
    """
    t_score = scores[target]
    greater = int((scores > t_score).sum())
    ties = int((scores == t_score).sum()) - 1
    if len(seen):
        seen_scores = scores[seen]
        greater -= int((seen_scores > t_score).sum())
        ties -= int((seen_scores == t_score).sum())
    if greater >= K:
        return 0.0, 0.0
    ranks = np.arange(greater, min(greater + ties, K - 1) + 1)
    share = 1.0 / (ties + 1)
    return len(ranks) * share, float((1.0 / np.log2(ranks + 2.0)).sum() * share)


def prequential_implicit(data: Interactions, config: MFConfig, ranker: str = "model",
                         item_metadata: dict[str, tuple[dict | None, str | None]] | None = None,
                         refresh_every: int = 5000, cold_count: int = 5, text_encoder: str = "hashed",
                         group: MemberStates | None = None) -> EvalResult:
    """HR@10 / NDCG@10 of rank-then-learn, event by event; ``ranker``: "model" or "popularity" (so far).

    An event is ranked among the items that exist before it (seen in an earlier
    event, or, with ``item_metadata``, described by metadata) that the user has
    not had yet. An event on an item that does not exist yet cannot be ranked
    and is left out of the main metrics. ``hit_rate@10_cold`` covers the events
    on items with fewer than ``cold_count`` earlier events, counting unrankable
    ones as misses, so runs with and without metadata compare on the same events;
    ``hit_rate@10_warm`` covers the others (always rankable, the same events in every run).
    With metadata (text encoded by ``text_encoder``, see embeddings.text),
    items with no events get content vectors every ``refresh_every`` events.

    ``group`` (see evaluation.members; not with metadata): each event is ranked and learned by the
    state of the member that owns its user, and the group is told after each event (to sync).
    An event is then evaluated if its item exists anywhere (seen in an earlier event): a member
    that has not heard of it yet misses it, so every group size is scored on the same events.
    """
    from recstream.stream.state import RecState  # the service's state: same learning and content code

    item_index, n_items = _rows(data.item_ids)
    if group is not None and (ranker != "model" or item_metadata):
        raise ValueError("a group of members ranks with the model, without item metadata")
    state = RecState(config, history_per_user=1_000_000) if ranker == "model" and group is None else None
    ranks = ranker == "model"
    if state is not None and item_metadata:
        state.use_text_encoder(text_encoder)
        ids = list(item_metadata)
        state.set_item_metadata(ids, [item_metadata[i][0] for i in ids], [item_metadata[i][1] for i in ids])
    counts = np.zeros(n_items, dtype=np.float64)
    seen: dict[str, list[int]] = {}
    hits = np.zeros(len(data), dtype=np.float64)
    gains = np.zeros(len(data), dtype=np.float64)
    evaluated = np.zeros(len(data), dtype=bool)
    cold = np.zeros(len(data), dtype=bool)
    known_items = 0
    no_rating = np.full(1, np.nan, dtype=np.float32)
    started = time.perf_counter()
    for n in range(len(data)):
        user, item, index = data.user_ids[n], data.item_ids[n], int(item_index[n])
        history = seen.setdefault(user, [])
        cold[n] = counts[index] < cold_count
        if ranks:
            if group is not None:
                state = group.state_of(n)
            model = state.model
            row = model.items.ids.get(item)
            rankable = row is not None and len(model.items) > K
            evaluated[n] = rankable if group is None else index < known_items and known_items > K
            if evaluated[n] and not rankable:
                group.unranked += 1  # a miss: the owner has not heard of the item yet
            if rankable:
                if row not in history:  # a repeat can never be a hit once seen items are excluded
                    user_row = model.users.ids.get(user)
                    vector = (model.query_vectors(np.array([user_row]), int(data.timestamps[n]))[0]
                              if user_row is not None else np.zeros(model.config.dim, np.float32))
                    scores = model.items.vectors @ vector + (model.ranking_biases() if group is None
                                                             else group.ranking_biases(n))
                    if user_row is not None and state.sessions.enabled:  # the blend the service publishes
                        rows, blend = state.sessions.candidates(np.array([user_row]), int(data.timestamps[n]))[0]
                        if len(rows):
                            scores = model.config.session_mf_weight * scores
                            scores[rows] += blend
                    hits[n], gains[n] = _hit_and_gain(scores, row, np.asarray(history, dtype=np.int64))
            batch_users = model.users.rows(data.user_ids[n:n + 1])
            batch_items = model.items.rows(data.item_ids[n:n + 1])
            state.learn_rows(batch_users, batch_items, no_rating, data.weights[n:n + 1], None,
                             data.timestamps[n:n + 1])
            row = int(batch_items[0])
            if item_metadata and (n + 1) % refresh_every == 0:
                state.refresh_cold_items(cold_count)
            if group is not None:
                group.event_learned(n)
        else:
            row = index
            if index < known_items:
                evaluated[n] = True
                if index not in history:
                    hits[n], gains[n] = _hit_and_gain(counts[:known_items], index, np.asarray(history, dtype=np.int64))
        known_items = max(known_items, index + 1)
        counts[index] += 1.0
        if row not in history:
            history.append(row)
    seconds = time.perf_counter() - started
    count = max(int(evaluated.sum()), 1)
    hit_rate = float(hits[evaluated].sum() / count)
    return EvalResult({"events": len(data), "events_evaluated": int(evaluated.sum()),
                       "events_per_s": len(data) / seconds, "hit_rate@10": hit_rate,
                       "ndcg@10": float(gains[evaluated].sum() / count), "recall@10": hit_rate,
                       "cold_events": int(cold.sum()),
                       "hit_rate@10_cold": float(hits[cold].sum() / max(int(cold.sum()), 1)),
                       "hit_rate@10_warm": float(hits[~cold].sum() / max(int((~cold).sum()), 1))},
                      hits[evaluated])


# -- implicit, split ----------------------------------------------------------------------------

def user_split(data: Interactions, test_fraction: float = 0.2, seed: int = 0
               ) -> tuple[Interactions, dict[str, set[str]]]:
    """Per user, a seeded random ``test_fraction`` of their interactions held out; the rest shuffled."""
    rng = np.random.default_rng(seed)
    users, _ = _rows(data.user_ids)
    order = rng.permutation(len(data))
    test = np.zeros(len(data), dtype=bool)
    by_user: dict[int, list[int]] = {}
    for n in order.tolist():
        by_user.setdefault(int(users[n]), []).append(n)
    for rows in by_user.values():
        n_test = int(round(len(rows) * test_fraction))
        test[rows[:n_test]] = True
    train = order[~test[order]]
    held: dict[str, set[str]] = {}
    for n in np.flatnonzero(test).tolist():
        held.setdefault(data.user_ids[n], set()).add(data.item_ids[n])
    pick = train.tolist()
    return Interactions([data.user_ids[n] for n in pick], [data.item_ids[n] for n in pick],
                        data.ratings[train], data.weights[train], data.timestamps[train]), held


def _ranking_metrics(top: dict[str, list[str]], held: dict[str, set[str]]) -> dict[str, float]:
    ndcg, recall, hit = [], [], []
    for user, relevant in held.items():
        ranked = top.get(user, [])
        gains = [1.0 / np.log2(r + 2.0) for r, item in enumerate(ranked[:K]) if item in relevant]
        ideal = sum(1.0 / np.log2(r + 2.0) for r in range(min(K, len(relevant))))
        ndcg.append(sum(gains) / ideal)
        recall.append(len(gains) / min(K, len(relevant)))
        hit.append(float(bool(gains)))
    return {"ndcg@10": float(np.mean(ndcg)), "recall@10": float(np.mean(recall)), "hit_rate@10": float(np.mean(hit)),
            "users": len(held)}


def split_model(train: Interactions, held: dict[str, set[str]], config: MFConfig, epochs: int) -> EvalResult:
    model = OnlineMF(config)
    started = time.perf_counter()
    for epoch in range(epochs):  # as `recstream replay --epochs` does
        for s in range(0, len(train), 10_000):
            e = min(s + 10_000, len(train))
            model.learn_rows(model.users.rows(train.user_ids[s:e]), model.items.rows(train.item_ids[s:e]),
                             train.ratings[s:e], train.weights[s:e], rate_scale=epoch_rate_scale(epoch, epochs))
    seconds = time.perf_counter() - started
    history = InteractionHistory(max_per_user=1_000_000)
    history.add(model.users.rows(train.user_ids), model.items.rows(train.item_ids))
    from recstream.index.query import Recommender

    users = [u for u in held if model.users.ids.get(u) is not None]
    rows = np.array([model.users.ids.get(u) for u in users], dtype=np.int64)
    # Held-out interactions come long after training: any short-term interest has faded.
    recs = Recommender(model, history, K).recommend(rows, None, now_ms=2**62)
    top = {u: model.items.ids.ids_of(recs.of(n)[0].tolist()) for n, u in enumerate(users)}
    metrics = _ranking_metrics(top, held)
    metrics.update(events=len(train) * epochs, events_per_s=len(train) * epochs / seconds)
    return EvalResult(metrics)


def split_als(train: Interactions, held: dict[str, set[str]], factors: int = 64, regularization: float = 30.0,
              alpha: float = 1.0, iterations: int = 15) -> EvalResult:
    """``implicit``'s ALS on the same split (raises ImportError without the package)."""
    import scipy.sparse as sp
    from implicit.als import AlternatingLeastSquares

    users, n_users = _rows(train.user_ids)
    items, n_items = _rows(train.item_ids)
    user_names = list(dict.fromkeys(train.user_ids))
    item_names = list(dict.fromkeys(train.item_ids))
    matrix = sp.csr_matrix((train.weights.astype(np.float32) * alpha, (users, items)), shape=(n_users, n_items))
    model = AlternatingLeastSquares(factors=factors, regularization=regularization, iterations=iterations,
                                    random_state=0)
    started = time.perf_counter()
    model.fit(matrix, show_progress=False)
    seconds = time.perf_counter() - started
    row_of = {u: r for r, u in enumerate(user_names)}
    eval_users = [u for u in held if u in row_of]
    ids, _ = model.recommend(np.array([row_of[u] for u in eval_users]), matrix[[row_of[u] for u in eval_users]],
                             N=K, filter_already_liked_items=True)
    top = {u: [item_names[i] for i in row if i >= 0] for u, row in zip(eval_users, ids)}
    metrics = _ranking_metrics(top, held)
    metrics.update(events=len(train), seconds=seconds)
    return EvalResult(metrics)


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window:
        window = max(1, len(values))
    cumulative = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    return (cumulative[window:] - cumulative[:-window]) / window

