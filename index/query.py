"""Top-K recommendations: exact scores for the items that changed since the index was built,
the Annoy index for the rest."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit
from recstream.embeddings.history import InteractionHistory
from recstream.embeddings.model import OnlineMF
from recstream.embeddings.session import SessionSignals
from recstream.index.build import mips_query
from recstream.index.refresh import BuiltIndex

_EXACT_CHUNK = 4_000_000  # scores per matrix product (float32: 16 MB)
# With this share of the items changed since the build, one exact product over all items is
# cheaper than a per-user index query, and the index would add nothing fresh.
_EXACT_ALL_FRACTION = 0.5


@njit(cache=True, nogil=True)
def top_k_per_row(scores, k):
    """Column indices and values of the ``k`` largest entries of each row, best first.

    One pass with a sorted buffer per row: after the first few columns nearly
    every entry fails a single comparison, which beats ``argpartition``
    several times over for small ``k``.
    """
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    out_idx = np.empty((n_rows, k), dtype=np.int64)
    out_val = np.empty((n_rows, k), dtype=np.float32)
    for r in range(n_rows):
        vals = out_val[r]
        idx = out_idx[r]
        vals[:] = -np.inf
        idx[:] = -1
        for c in range(n_cols):
            x = scores[r, c]
            if x <= vals[k - 1]:
                continue
            pos = k - 1
            while pos > 0 and vals[pos - 1] < x:
                vals[pos] = vals[pos - 1]
                idx[pos] = idx[pos - 1]
                pos -= 1
            vals[pos] = x
            idx[pos] = c
    return out_idx, out_val


@dataclass
class Recommendations:
    user_row: int
    item_rows: np.ndarray
    scores: np.ndarray


class Recommender:
    """Ranks items by ``ranking bias + u . q_i`` (see ``OnlineMF.ranking_biases`` and ``OnlineMF.query_vectors``).

    The items split in two: those that changed since the index was built
    (and all of them while there is no index) are scored exactly, in one
    matrix product for all users; the unchanged rest come from the Annoy
    index, whose vectors for them are still exact. So a stale index can miss
    nothing that changed; the hot items of a clickstream are the changed ones,
    and the long tail is what the index serves. Items the user interacted
    with are left out. Call with the model lock held: it reads live vectors.

    With ``sessions``, a user in a session gets the blend
    ``session_mf_weight * score + session signals`` (embeddings.session): the
    items the session signals reach are rescored and merged with the factor
    model's top-k, which is exact since the signals are never negative.
    """

    def __init__(self, model: OnlineMF, history: InteractionHistory | None, k: int, search_k: int = -1,
                 max_index_fetch: int = 200, sessions: SessionSignals | None = None) -> None:
        self.model = model
        self.history = history
        self.sessions = sessions if sessions is not None and sessions.enabled else None
        self.k = k
        self.search_k = search_k
        self.max_index_fetch = max_index_fetch

    def recommend(self, user_rows: np.ndarray, index: BuiltIndex | None, now_ms: int = 0) -> list[Recommendations]:
        """Top-k for each user; ``now_ms`` (event time) fades short-term interest (0: no fading)
        and ends sessions idle for longer than ``session_gap_s``."""
        recs = self._factor_top(user_rows, index, now_ms)
        if self.sessions is None or not recs:
            return recs
        return self._with_sessions(user_rows, recs, now_ms)

    def _with_sessions(self, user_rows: np.ndarray, recs: list[Recommendations], now_ms: int) -> list[Recommendations]:
        """Each user's factor top-k merged with the items their session reaches, by the blended score."""
        weight = np.float32(self.model.config.session_mf_weight)
        found = self.sessions.candidates(user_rows, now_ms)
        vectors = None
        out = []
        for n, (rec, (rows, blend)) in enumerate(zip(recs, found)):
            if len(rows) == 0:
                out.append(rec)
                continue
            if self.history is not None:
                seen = self.history.items_of(rec.user_row)
                if seen:
                    keep = np.fromiter((r not in seen for r in rows.tolist()), dtype=bool, count=len(rows))
                    rows, blend = rows[keep], blend[keep]
            if vectors is None:
                vectors = self.model.query_vectors(user_rows, now_ms)
            factor = self.model.items.vectors[rows] @ vectors[n] + self.model.ranking_biases(rows)
            only_factor = ~np.isin(rec.item_rows, rows)  # an item in both keeps its blended score
            cand_rows = np.concatenate([rec.item_rows[only_factor], rows])
            cand_scores = np.concatenate([weight * rec.scores[only_factor], weight * factor + blend]).astype(np.float32)
            top = np.argsort(-cand_scores, kind="stable")[: self.k]
            out.append(Recommendations(rec.user_row, cand_rows[top], cand_scores[top]))
        return out

    def _factor_top(self, user_rows: np.ndarray, index: BuiltIndex | None, now_ms: int) -> list[Recommendations]:
        n_items = len(self.model.items)
        if len(user_rows) == 0 or n_items == 0:
            return []
        users = self.model.query_vectors(user_rows, now_ms)
        Q = self.model.items.vectors
        biases = self.model.ranking_biases()
        changed = None if index is None else self.model.items_changed_since(index.model_version)
        if changed is None or len(changed) >= _EXACT_ALL_FRACTION * n_items:
            rows, scores = self._exact_top(users, user_rows, np.arange(n_items), Q, biases)
            short = ~np.isfinite(scores).all(axis=1)  # users who have seen nearly everything
            return [Recommendations(u, r[np.isfinite(s)], s[np.isfinite(s)]) if cut else Recommendations(u, r, s)
                    for u, r, s, cut in zip(user_rows.tolist(), rows, scores, short.tolist())]
        rows, scores = self._exact_top(users, user_rows, changed, Q, biases)
        is_changed = np.zeros(n_items, dtype=bool)
        is_changed[changed] = True
        out = []
        for n, u in enumerate(user_rows.tolist()):
            seen = self.history.items_of(u) if self.history is not None else {}
            fetch = self.k + min(len(seen), self.max_index_fetch)
            found = np.asarray(index.nearest(mips_query(users[n]), fetch, self.search_k), dtype=np.int64)
            keep = ~is_changed[found]
            if seen:
                keep &= np.fromiter((i not in seen for i in found.tolist()), dtype=bool, count=len(found))
            found = found[keep]
            cand_rows = np.concatenate([rows[n], found])
            cand_scores = np.concatenate([scores[n], Q[found] @ users[n] + biases[found]])
            top = np.argsort(-cand_scores, kind="stable")[: self.k]
            top = top[np.isfinite(cand_scores[top])]
            out.append(Recommendations(u, cand_rows[top], cand_scores[top]))
        return out

    def _exact_top(self, users: np.ndarray, user_rows: np.ndarray, items: np.ndarray, Q: np.ndarray,
                   biases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per user, the best ``k`` of ``items`` by exact score (seen items at -inf)."""
        k = min(self.k, len(items))
        Qc, bc = Q[items], biases[items]
        column_of = None
        if self.history is not None and len(items) != len(Q):
            column_of = np.full(len(Q), -1, dtype=np.int64)
            column_of[items] = np.arange(len(items))
        out_rows = np.empty((len(users), k), dtype=np.int64)
        out_scores = np.empty((len(users), k), dtype=np.float32)
        step = max(1, _EXACT_CHUNK // max(len(items), 1))
        for start in range(0, len(users), step):
            stop = min(start + step, len(users))
            scores = users[start:stop] @ Qc.T
            scores += bc
            if self.history is not None:
                at_user, at_item = self.history.pairs(user_rows[start:stop])
                if column_of is not None:
                    at_item = column_of[at_item]
                    at_user, at_item = at_user[at_item >= 0], at_item[at_item >= 0]
                scores[at_user, at_item] = -np.inf
            best, best_scores = top_k_per_row(scores, k)
            out_rows[start:stop] = np.where(best >= 0, items[best], -1)
            out_scores[start:stop] = best_scores
        return out_rows, out_scores
