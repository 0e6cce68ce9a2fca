"""Next-click quality on session logs, streaming: ``recstream eval --protocol session``.

Events stream in log order. Each click after a session's first, on an item
seen before, is ranked with the state before it, then learned; every method
ranks all items seen so far. Two columns:

- ``hr@20``/``mrr@20``: every such click, repeats of the session's items count;
- ``hr@20_new``/``mrr@20_new``: the clicks on an item new to the session,
  ranked among the items not in the session (the "exclude seen" use case).

Ties are broken at random in expectation (see ``expected_hit_rr``). A session
is a user's run of events with gaps under ``session_gap_s`` (the model's
setting), so with session ids as user ids it is the session.

Baselines, in the same run on the same clicks, are reference implementations
of session-rec's definitions (Ludewig et al.), learned online:

- popularity so far;
- SR (sequential rules): ``y -> x`` gains ``1 / gap`` when ``x`` follows ``y``
  within 10 clicks of a session; the last click's 20 strongest rules score;
- V-SKNN: the 1,000 most recent sessions sharing an item with the current
  one, similarity the sum of the shared items' position weights, the 100 most
  similar, each adding ``sim / step`` to its items (``step``: how far back the
  newest shared item is).
"""

from __future__ import annotations

import heapq
import time

import numpy as np
from recstream.embeddings.model import MFConfig
from recstream.embeddings.session_kernels import K, expected_hit_rr, rank_then_learn
from recstream.evaluation.prequential import EvalResult, Interactions, _rows


def _rank(scores: np.ndarray, target: int, excluded: np.ndarray) -> tuple[float, float]:
    """``expected_hit_rr`` of ``target`` in ``scores`` with the columns ``excluded`` left out."""
    t = scores[target]
    greater = int((scores > t).sum()) - int((scores[excluded] > t).sum())
    ties = int((scores == t).sum()) - 1 - int((scores[excluded] == t).sum())
    return expected_hit_rr(greater, ties, K)


def session_numbers(users: np.ndarray, timestamps: np.ndarray, gap_ms: float) -> np.ndarray:
    """Per event, a number for its session: a user's events with gaps up to ``gap_ms``.

    >>> session_numbers(np.array([0, 1, 0, 0]), np.array([0, 5, 10, 9000]), 100.0).tolist()
    [0, 1, 0, 2]
    """
    out = np.empty(len(users), dtype=np.int64)
    current: dict[int, tuple[int, int]] = {}
    count = 0
    for n, (u, t) in enumerate(zip(users.tolist(), timestamps.tolist())):
        last = current.get(u)
        if last is None or t - last[1] > gap_ms:
            last = (count, t)
            count += 1
        current[u] = (last[0], t)
        out[n] = last[0]
    return out


class _Counts:
    """Accumulates both columns' hits and reciprocal ranks."""

    def __init__(self) -> None:
        self.sums = np.zeros(4)
        self.counts = np.zeros(2, dtype=np.int64)

    def add(self, hit: float, rr: float, new: tuple[float, float] | None) -> None:
        self.sums[:2] += (hit, rr)
        self.counts[0] += 1
        if new is not None:
            self.sums[2:] += new
            self.counts[1] += 1

    def metrics(self, events: int, seconds: float, cpu_seconds: float) -> dict[str, float]:
        """``events_per_cpu_s``: per second of this process's CPU time, which other load on the machine
        changes less than the wall-clock ``events_per_s``."""
        all_, new = max(int(self.counts[0]), 1), max(int(self.counts[1]), 1)
        return {f"hr@{K}": self.sums[0] / all_, f"mrr@{K}": self.sums[1] / all_,
                f"hr@{K}_new": self.sums[2] / new, f"mrr@{K}_new": self.sums[3] / new,
                "events": events, "events_evaluated": int(self.counts[0]),
                "events_evaluated_new": int(self.counts[1]), "events_per_s": events / seconds,
                "events_per_cpu_s": events / max(cpu_seconds, 1e-9)}


# -- baselines ----------------------------------------------------------------------------------

class _Popularity:
    def __init__(self) -> None:
        self.counts = np.zeros(1024)

    def scores(self, session: list[int], session_no: int, known: int) -> np.ndarray:
        return self.counts[:known]

    def learn(self, session: list[int], session_no: int, item: int, t: int) -> None:
        if item >= len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(len(self.counts))])
        self.counts[item] += 1.0


class _SequentialRules:
    """session-rec's SR (steps 10, weighting div, pruning 20), counted online."""

    def __init__(self, steps: int = 10, pruning: int = 20) -> None:
        self.steps, self.pruning = steps, pruning
        self.rules: dict[int, dict[int, float]] = {}

    def scores(self, session: list[int], session_no: int, known: int) -> np.ndarray:
        out = np.zeros(known)
        rules = self.rules.get(session[-1])
        if rules:
            best = heapq.nlargest(self.pruning, rules.items(), key=lambda kv: kv[1])
            out[[x for x, _ in best]] = [w for _, w in best]
        return out

    def learn(self, session: list[int], session_no: int, item: int, t: int) -> None:
        for i in range(1, min(self.steps, len(session)) + 1):
            rules = self.rules.setdefault(session[-i], {})
            rules[item] = rules.get(item, 0.0) + 1.0 / i


class _VSKNN:
    """session-rec's VMContextKNN (k 100, sample 1,000 recent, weighting div, div_score, remind)."""

    def __init__(self, k: int = 100, sample: int = 1000) -> None:
        self.k, self.sample = k, sample
        self.item_sessions: dict[int, set[int]] = {}
        self.session_items: dict[int, set[int]] = {}
        self.session_time: dict[int, int] = {}

    def scores(self, session: list[int], session_no: int, known: int) -> np.ndarray:
        out = np.zeros(known)
        pos = {x: (n + 1) / len(session) for n, x in enumerate(session)}
        relevant: set[int] = set()
        for x in pos:
            relevant |= self.item_sessions.get(x, set())
        relevant.discard(session_no)
        if len(relevant) > self.sample:
            relevant = set(heapq.nlargest(self.sample, relevant, key=self.session_time.__getitem__))
        neighbours = []
        for s in relevant:
            sim = sum(pos[x] for x in self.session_items[s] if x in pos) / len(pos)
            if sim > 0:
                neighbours.append((s, sim))
        neighbours = heapq.nlargest(self.k, neighbours, key=lambda sv: sv[1])
        for s, sim in neighbours:
            items = self.session_items[s]
            step = next(n for n, x in enumerate(reversed(session), 1) if x in items)
            out[list(items)] += sim / step
        return out

    def learn(self, session: list[int], session_no: int, item: int, t: int) -> None:
        self.item_sessions.setdefault(item, set()).add(session_no)
        self.session_items.setdefault(session_no, set()).add(item)
        self.session_time[session_no] = t


BASELINES = {"popularity": _Popularity, "sr": _SequentialRules, "vsknn": _VSKNN}


def prequential_baseline(data: Interactions, name: str, gap_s: float = 1800.0) -> EvalResult:
    """A baseline (``popularity``, ``sr`` or ``vsknn``) through the session protocol."""
    items, _ = _rows(data.item_ids)
    users, _ = _rows(data.user_ids)
    sessions = session_numbers(users, data.timestamps, gap_s * 1000.0)
    method = BASELINES[name]()
    clicks: dict[int, list[int]] = {}
    counts = _Counts()
    known = 0
    started, cpu = time.perf_counter(), time.process_time()
    for n, (item, s, t) in enumerate(zip(items.tolist(), sessions.tolist(), data.timestamps.tolist())):
        session = clicks.setdefault(s, [])
        if session and item < known:
            scores = method.scores(session, s, known)
            in_session = np.unique(np.asarray(session, dtype=np.int64))
            counts.add(*_rank(scores, item, in_session[:0]),
                       None if item in session else _rank(scores, item, in_session))
        method.learn(session, s, item, t)
        session.append(item)
        known = max(known, item + 1)
    return EvalResult(counts.metrics(len(data), time.perf_counter() - started, time.process_time() - cpu))


def _new_to_session(items: np.ndarray, sessions: np.ndarray) -> np.ndarray:
    """Per event: is its item new to its session?

    >>> _new_to_session(np.array([3, 4, 3, 3]), np.array([0, 0, 0, 1])).tolist()
    [True, True, False, True]
    """
    seen: set[tuple[int, int]] = set()
    out = np.zeros(len(items), dtype=bool)
    for n, pair in enumerate(zip(sessions.tolist(), items.tolist())):
        out[n] = pair not in seen
        seen.add(pair)
    return out


# -- recstream ----------------------------------------------------------------------------------

def prequential_session(data: Interactions, config: MFConfig, batch: int = 2048) -> EvalResult:
    """recstream (factor model + session signals, as RecState learns them) through the session protocol.

    The session signals rank and learn event by event inside one compiled
    call per ``batch``; the factor model's scores for a batch are computed
    before it (for the events that are ranked) and it learns the batch after,
    as the service does.
    """
    from recstream.stream.state import RecState

    state = RecState(config, history_per_user=1)
    model, signals = state.model, state.sessions
    first_row, _ = _rows(data.item_ids)
    known = np.maximum.accumulate(np.concatenate([[0], first_row[:-1] + 1]))  # items seen before each event
    sessions = session_numbers(_rows(data.user_ids)[0], data.timestamps, config.session_gap_s * 1000.0)
    new = _new_to_session(first_row, sessions)
    starts = np.ones(len(data), dtype=bool)
    starts[1:] = sessions[1:] > np.maximum.accumulate(sessions)[:-1]  # a session's first event has a new number
    ranked = (first_row < known) & ~starts
    results = np.zeros((len(data), 6))
    no_rating = np.full(batch, np.nan, dtype=np.float32)
    keys = np.zeros(len(data), dtype=np.int64)
    mf_weight = np.float32(config.session_mf_weight)
    empty = np.zeros(0, dtype=np.int64)  # compile before the clock starts
    rank_then_learn(empty, empty, empty, empty, empty, np.zeros(0, bool), empty, np.zeros((0, 1), np.float32), mf_weight,
                     results[:0], signals.score_args(), signals.learn_args())
    started, cpu = time.perf_counter(), time.process_time()
    for s in range(0, len(data), batch):
        e = min(s + batch, len(data))
        users = model.users.rows(data.user_ids[s:e])
        items = model.items.rows(data.item_ids[s:e])
        ts = data.timestamps[s:e]
        signals.fit(len(model.users), len(model.items))
        n_known = max(int(known[e - 1]), 1)
        mf_row = np.where(ranked[s:e], np.cumsum(ranked[s:e]) - 1, -1)  # the events ranked get a row of scores
        mf = np.zeros((int(ranked[s:e].sum()), n_known), dtype=np.float32)
        if len(mf) and mf_weight:
            at = np.flatnonzero(ranked[s:e])
            mf = model.query_vectors(users[at], ts[at]) @ model.items.vectors[:n_known].T
            mf += model.ranking_biases()[:n_known]
        rank_then_learn(users, items, ts, keys[s:e], known[s:e], new[s:e], mf_row, mf, mf_weight, results[s:e],
                         signals.score_args(), signals.learn_args())
        model.learn_rows(users, items, no_rating[: e - s], data.weights[s:e], None, ts)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    counts = _Counts()
    counts.sums[:] = results[:, [1, 2, 4, 5]].sum(axis=0)
    counts.counts[:] = results[:, [0, 3]].sum(axis=0)
    return EvalResult(counts.metrics(len(data), seconds, cpu), results[:, 1][results[:, 0] > 0])
