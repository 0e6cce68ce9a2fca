"""Top-K recommendations for a batch of users: exact scores over the items that can win, the
Annoy index for the long tail.

The score of item ``i`` for user ``u`` is ``s(u, i) = r_i + x_u . q_i`` (``r_i`` the item's
ranking bias, ``x_u`` the user's query vector: see ``OnlineMF.ranking_biases`` and
``OnlineMF.query_vectors``). The items split in two:

- the **hot set** ``H``, at most ``exact_items`` items, scored exactly with the live vectors for
  all users of a batch in one matrix product per chunk: the items in the ring of recent
  positives (ranking boosts them by ``log1p`` of their count there, so a clickstream's top-K is
  nearly always among them), then the items of highest potential ``r_i + c |q_i|`` (``c`` the
  median query norm of the batch): the best any user of typical norm could score them. A
  catalogue of at most ``exact_items`` items is scored exactly in full. Exact, but not by brute
  force: ``index/exact.py`` visits only the clusters of items that can still win;
- the **tail** (everything else) comes from the Annoy index, for users whose tail could still
  beat their hot top-K: by Cauchy-Schwarz no tail item scores above
  ``max_{i in tail} (r_i + |x_u| |q_i|)`` (bounded over bands of item norm, ``_norm_bands``), so
  a user whose ``k``-th best hot score is above that bound needs no lookup and their list is exact. Lookups cost far more than exact
  scores (a tree walk per user), so at most ``max_lookups`` users per call get one, those with
  the widest gap between bound and list first; the index's candidates are scored again with the
  live vectors before they are merged.

With session signals (``embeddings/session.py``), a user in a session gets the blend
``w s(u, i) + g(u, i)`` (``w = session_mf_weight``, ``g`` the session signals, never negative,
zero for items they do not reach). Their candidates come first: each user's top-k of the items
the signals reach, scored exactly. An item they do not reach scores ``w s(u, i) <= w B_u``, with
``B_u`` the norm-band bound over the whole catalogue, so

- a user whose ``k``-th candidate scores above ``w B_u`` has their list: no factor scores at all
  (a user who has just clicked usually is one);
- for the others only items with ``s(u, i) > T_u / w`` (``T_u`` their ``k``-th candidate) can
  enter: the factor top-k above that floor (hot set and tail as above, each pruned by it) is
  merged in. Both steps are exact.

Items the user interacted with recently are left out, and so are items with fewer than
``min_item_events`` events (the frequency filter: see ``IndexConfig``), the free rows of forgotten
items, and the index's entries for rows whose item was forgotten after its build (bounded memory:
the row is free, or another item's, which the index does not hold). Call with the model lock
held: it reads live vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from recstream.embeddings.history import InteractionHistory
from recstream.embeddings.model import OnlineMF
from recstream.embeddings.session import SessionSignals
from recstream.index.build import mips_query
from recstream.index.exact import ClusteredItems, among, insert_descending
from recstream.index.refresh import BuiltIndex

# Below this many scores per call (users x hot items), a plain product beats clustering the items.
_BRUTE_FORCE_SCORES = 1_000_000


@njit(cache=True, nogil=True)
def _merge_into(top_rows, top_scores, r, cand_rows, cand_scores, n):
    """Merge ``n`` candidates (rows, scores) into row ``r`` of the top-k arrays (no duplicates)."""
    k = top_rows.shape[1]
    vals = top_scores[r]
    idx = top_rows[r]
    for c in range(n):
        x = cand_scores[c]
        if x > vals[k - 1] and not among(idx, 0, k, cand_rows[c]):
            insert_descending(vals, idx, k, x, cand_rows[c])


# Session candidates scored before the others (see _candidates_top_k): a few times k.
_FIRST_SCORED = 40

# Bands of item norm for the tail bound: 64 came within 0.1% of the exact envelope on a 1M-item model.
_NORM_BANDS = 64


@njit(cache=True, nogil=True)
def _norm_bands(item_norms, biases, mask, n_bands):
    """Largest norm and largest ranking bias of the ``mask`` items in each of ``n_bands`` equal bands
    of item norm (empty bands: norm 0, bias -inf).

    By Cauchy-Schwarz an item of band ``j`` scores at most ``bias[j] + |x| norm[j]`` for a user of
    query norm ``|x|``, so the tail's best score is at most the largest of those: the upper envelope
    of the lines ``r_i + |x| |q_i|`` taken over bands. Taking the largest bias and the largest norm of
    the whole tail instead pairs the most popular item's bias with the longest vector, which no item
    has: in 32 dimensions that bound let most users' tails look able to win, and each such user cost
    an index lookup.
    """
    top = np.float32(0.0)
    for i in range(len(item_norms)):
        if mask[i] and item_norms[i] > top:
            top = item_norms[i]
    band_norm = np.zeros(n_bands, dtype=np.float32)
    band_bias = np.full(n_bands, -np.inf, dtype=np.float32)
    if top <= 0:
        for i in range(len(item_norms)):  # every vector is zero: one band
            if mask[i] and biases[i] > band_bias[0]:
                band_bias[0] = biases[i]
        return band_norm, band_bias
    scale = n_bands / top
    for i in range(len(item_norms)):
        if not mask[i]:
            continue
        j = min(int(item_norms[i] * scale), n_bands - 1)
        if item_norms[i] > band_norm[j]:
            band_norm[j] = item_norms[i]
        if biases[i] > band_bias[j]:
            band_bias[j] = biases[i]
    return band_norm, band_bias


class _ItemNorms:
    """``|q_i|`` of every item, recomputed only for the items changed since the last call."""

    def __init__(self) -> None:
        self.norms = np.zeros(0, dtype=np.float32)
        self.model_version = -1

    def update(self, model: OnlineMF) -> np.ndarray:
        Q = model.items.vectors
        if self.model_version < 0 or len(self.norms) > len(Q):  # first call, or a restored model
            changed = np.arange(len(Q))
        else:
            changed = model.items_changed_since(self.model_version)
        if len(self.norms) < len(Q):
            self.norms = np.concatenate([self.norms, np.zeros(len(Q) - len(self.norms), dtype=np.float32)])
        rows = Q[changed]
        self.norms[changed] = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        self.model_version = model.model_version
        return self.norms


@njit(cache=True, nogil=True, parallel=True)
def _candidates_top_k(users, Q, biases, weight, factor_bound, start, cand_rows, cand_blend, seen_start, seen_items, k):
    """Each user's top-k of their session candidates ``cand_rows[start[n]:start[n + 1]]`` by the
    blended score ``weight * s(u, i) + blend``, remembered items left out.

    A candidate can score at most its blend plus ``weight`` times ``factor_bound[n]`` (a bound on
    the user's factor scores); it is scored exactly only if that could enter the list. The
    ``_FIRST_SCORED`` highest blends are scored first, so the list fills with strong candidates
    and the rest are mostly passed over: a few dozen exact scores per user when the signals
    reach hundreds of items, and no sort.
    """
    n_users = len(start) - 1
    dim = Q.shape[1]
    out_rows = np.full((n_users, k), -1, dtype=np.int64)
    out_scores = np.full((n_users, k), -np.inf, dtype=np.float32)
    for n in prange(n_users):  # users are independent: each writes its own row
        a, b = start[n], start[n + 1]
        if a == b:
            continue
        vals = out_scores[n]
        idx = out_rows[n]
        reach = weight * factor_bound[n]
        first = min(_FIRST_SCORED, b - a)
        strong = -np.partition(-cand_blend[a:b], first - 1)[first - 1]  # the first-th highest blend
        for strong_pass in (True, False):
            for c in range(a, b):
                if (cand_blend[c] >= strong) != strong_pass or cand_blend[c] + reach <= vals[k - 1]:
                    continue
                item = cand_rows[c]
                factor = biases[item]
                for f in range(dim):
                    factor += users[n, f] * Q[item, f]
                x = weight * factor + cand_blend[c]
                # (remembered items are checked last: a user's history runs to hundreds of items)
                if x > vals[k - 1] and not among(seen_items, seen_start[n], seen_start[n + 1], item):
                    insert_descending(vals, idx, k, x, item)
    return out_rows, out_scores


@njit(cache=True, nogil=True, parallel=True)
def _merge_factor(top_rows, top_scores, at, factor_rows, factor_scores, weight, start):
    """Merge the factor top-k of users ``at`` (``factor_*[j]`` for user ``at[j]``) into their
    session top-k (in place), as ``weight`` times the factor score; a user without session
    candidates (``start[n] == start[n + 1]``) gets the factor list as it is.

    An item in both lists is there with its blended score already, which is higher.
    """
    k = top_rows.shape[1]
    for j in prange(len(at)):
        n = at[j]
        vals = top_scores[n]
        idx = top_rows[n]
        if start[n] == start[n + 1]:
            vals[:] = factor_scores[j]
            idx[:] = factor_rows[j]
            continue
        for c in range(k):
            item = factor_rows[j, c]
            if item < 0:
                break
            x = weight * factor_scores[j, c]
            if x > vals[k - 1] and not among(idx, 0, k, item):
                insert_descending(vals, idx, k, x, item)


@dataclass
class TopK:
    """The top-k of a batch of users: row ``n`` is ``user_rows[n]``'s list, best first.

    A user with fewer than ``k`` candidates (one who has seen nearly every item) has
    ``item_rows == -1`` and ``scores == -inf`` at the end of their row.
    """

    user_rows: np.ndarray  # (B,) int64
    item_rows: np.ndarray  # (B, k) int64
    scores: np.ndarray  # (B, k) float32

    def __len__(self) -> int:
        return len(self.user_rows)

    def of(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n``-th user's item rows and scores, without the padding."""
        found = self.item_rows[n] >= 0
        return self.item_rows[n][found], self.scores[n][found]


@dataclass
class QueryStats:
    """What the last :meth:`Recommender.recommend` call did (for logs, metrics and benchmarks)."""

    users: int = 0
    exact_items: int = 0  # size of the exactly scored hot set
    tail_possible: int = 0  # users whose tail could beat their hot top-k (the bound)
    index_lookups: int = 0  # users whose tail the index was asked for
    settled_by_session: int = 0  # users whose session candidates alone made their list


class Recommender:
    """Top-k per user: the hot set scored exactly, the tail from the Annoy index when it can matter.

    ``exact_items`` caps the hot set (None: every item is scored exactly, as evaluation wants);
    ``max_lookups`` caps the index lookups per call. See the module docstring for the rule.

    >>> import numpy as np
    >>> from recstream.embeddings.model import MFConfig, OnlineMF
    >>> mf = OnlineMF(MFConfig(dim=4, seed=0))
    >>> mf.learn(["a", "a", "b"], ["x", "y", "z"])
    >>> top = Recommender(mf, None, k=2).recommend(np.array([0]), None)
    >>> top.item_rows.shape, bool(np.isfinite(top.scores).all())
    ((1, 2), True)
    """

    def __init__(self, model: OnlineMF, history: InteractionHistory | None, k: int, search_k: int = -1,
                 max_index_fetch: int = 50, exact_items: int | None = None, max_lookups: int = 1000,
                 sessions: SessionSignals | None = None, min_item_events: int = 1) -> None:
        self.model = model
        self.history = history
        self.sessions = sessions if sessions is not None and sessions.enabled else None
        self.k = k
        self.search_k = search_k
        self.max_index_fetch = max_index_fetch
        self.exact_items = exact_items
        self.max_lookups = max_lookups
        self.min_item_events = min_item_events
        self.last = QueryStats()
        self._item_norms = _ItemNorms()

    def eligible(self) -> np.ndarray | None:
        """Which item rows may be recommended (None: all): those with ``min_item_events`` events
        that hold an item (a forgotten item's row is free until a new item takes it)."""
        free = self.model.items.ids.free
        if self.min_item_events <= 1 and len(free) == 0:
            return None
        n_items = len(self.model.items)
        if self.min_item_events <= 1:
            eligible = np.ones(n_items, dtype=bool)
        else:
            eligible = self.model.interaction_counts(np.arange(n_items)) >= self.min_item_events
        eligible[free] = False
        return eligible

    def hot_items(self, query_norm: float, item_norms: np.ndarray, biases: np.ndarray,
                  eligible: np.ndarray | None = None) -> np.ndarray:
        """Item rows scored exactly (sorted): the recently popular, then the highest potential
        (of the ``eligible`` items, if given)."""
        n_items = len(biases) if eligible is None else int(np.count_nonzero(eligible))
        cap = self.exact_items
        if cap is None or n_items <= cap:
            return np.arange(len(biases)) if eligible is None else np.flatnonzero(eligible)
        potential = biases + np.float32(query_norm) * item_norms
        # Recently popular items first, in order of potential among themselves.
        potential[self.model.recently_popular()] += np.float32(1e9)
        if eligible is not None:
            potential[~eligible] = -np.inf
        hot = np.argpartition(-potential, cap - 1)[:cap]
        hot.sort()
        return hot

    def recommend(self, user_rows: np.ndarray, index: BuiltIndex | None, now_ms: int = 0,
                  use_index: bool = True) -> TopK:
        """Top-k for each of ``user_rows``; ``now_ms`` (event time) fades short-term interest (0: no fading)
        and ends sessions idle for longer than ``session_gap_s``.

        ``use_index=False`` answers from the hot set alone (a catch-up that must not fall behind).
        """
        user_rows = np.asarray(user_rows, dtype=np.int64)
        n_items = len(self.model.items)
        k = self.k
        if len(user_rows) == 0 or n_items == 0:
            self.last = QueryStats(len(user_rows))
            return TopK(user_rows, np.full((len(user_rows), k), -1, np.int64),
                        np.full((len(user_rows), k), -np.inf, np.float32))
        users = self.model.query_vectors(user_rows, now_ms)
        biases = self.model.ranking_biases()
        user_norms = np.sqrt(np.einsum("ij,ij->i", users, users))
        item_norms = self._item_norms.update(self.model)
        eligible = self.eligible()
        stats = QueryStats(len(user_rows))
        if self.sessions is None:
            top_rows, top_scores = self._factor_top(user_rows, users, user_norms, item_norms, biases, eligible, None,
                                                    index, use_index, stats)
            self.last = stats
            return TopK(user_rows, top_rows, top_scores)
        weight = np.float32(self.model.config.session_mf_weight)
        # Session candidates span the catalogue: bound their factor scores over every item.
        bound = self._score_bound(user_norms, np.ones(n_items, bool) if eligible is None else eligible,
                                  item_norms, biases)
        start, top_rows, top_scores = self._session_top(user_rows, users, biases, eligible, weight, bound, now_ms)
        # A user whose k-th session candidate beats what any other item can score (weight times
        # the bound) has their list: no factor top-k is needed. For the others, only items whose
        # factor score times the weight beats that k-th candidate can enter.
        kth = top_scores[:, -1]
        rest = np.flatnonzero(~(kth > weight * bound))
        stats.settled_by_session = len(user_rows) - len(rest)
        if len(rest):
            floor = (kth[rest] / weight if weight > 0 else np.full(len(rest), -np.inf, np.float32)).astype(np.float32)
            factor_rows, factor_scores = self._factor_top(user_rows[rest], users[rest], user_norms[rest], item_norms,
                                                          biases, eligible, floor, index, use_index, stats)
            _merge_factor(top_rows, top_scores, rest, factor_rows, factor_scores, weight, start)
        self.last = stats
        return TopK(user_rows, top_rows, top_scores)

    def _factor_top(self, user_rows: np.ndarray, users: np.ndarray, user_norms: np.ndarray, item_norms: np.ndarray,
                    biases: np.ndarray, eligible: np.ndarray | None, floor: np.ndarray | None,
                    index: BuiltIndex | None, use_index: bool, stats: QueryStats) -> tuple[np.ndarray, np.ndarray]:
        """Each user's top-k by factor score: the hot set exactly, the tail from the index where it
        can matter (see the module docstring); items scoring ``floor[n]`` or less are left out."""
        Q = self.model.items.vectors
        n_items = len(Q)
        hot = self.hot_items(float(np.median(user_norms)), item_norms, biases, eligible)
        seen_start, seen_items = self._seen(user_rows)
        top_rows, top_scores = self._exact_top(users, hot, Q, biases, seen_start, seen_items, floor)
        stats.exact_items = len(hot)
        tail = np.ones(n_items, dtype=bool) if eligible is None else eligible.copy()
        tail[hot] = False
        if tail.any():
            need = self._tail_possible(user_norms, tail, item_norms, biases, top_scores, floor)
            stats.tail_possible = len(need)
            if index is not None and use_index:
                stats.index_lookups = self._add_tail(users, index, tail, need[: self.max_lookups], Q, biases,
                                                     seen_start, seen_items, top_rows, top_scores)
        return top_rows, top_scores

    def _session_top(self, user_rows: np.ndarray, users: np.ndarray, biases: np.ndarray, eligible: np.ndarray | None,
                     weight: np.float32, factor_bound: np.ndarray, now_ms: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where each user's session candidates start in the CSR of the signals, and their top-k by
        the blended score (items below ``index.min_item_events`` and remembered ones left out);
        ``factor_bound``: per user, a bound on any item's factor score."""
        start, rows, blend = self.sessions.candidates_csr(user_rows, now_ms)
        if eligible is not None and len(rows):
            keep = eligible[rows]
            start = np.concatenate([[0], np.cumsum(keep)])[start]
            rows, blend = rows[keep], blend[keep]
        if len(rows) == 0:
            no_rows = np.full((len(user_rows), self.k), -1, np.int64)
            return start, no_rows, np.full((len(user_rows), self.k), -np.inf, np.float32)
        seen_start, seen_items = self._seen(user_rows)
        top_rows, top_scores = _candidates_top_k(np.ascontiguousarray(users, dtype=np.float32),
                                                 self.model.items.vectors, biases, weight, factor_bound, start, rows,
                                                 blend.astype(np.float32), seen_start, seen_items, self.k)
        return start, top_rows, top_scores

    def _seen(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each user's remembered items, CSR-style: ``items[start[n]:start[n + 1]]`` for user ``n``."""
        if self.history is None:
            return np.zeros(len(user_rows) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        at_user, items = self.history.pairs(user_rows)
        start = np.zeros(len(user_rows) + 1, dtype=np.int64)
        np.cumsum(np.bincount(at_user, minlength=len(user_rows)), out=start[1:])
        return start, items

    def _exact_top(self, users: np.ndarray, items: np.ndarray, Q: np.ndarray, biases: np.ndarray,
                   seen_start: np.ndarray, seen_items: np.ndarray, floor: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Per user, the best ``k`` of ``items`` by exact score, remembered items and those scoring
        ``floor[n]`` or less left out."""
        k = self.k
        if len(items) == 0:
            return np.full((len(users), k), -1, dtype=np.int64), np.full((len(users), k), -np.inf, dtype=np.float32)
        if len(users) * len(items) > _BRUTE_FORCE_SCORES:
            return ClusteredItems(Q[items], biases[items], items).top_k(users, seen_start, seen_items, k, floor)
        # A few users (a query, a small round): one product costs less than clustering the items.
        scores = users @ Q[items].T + biases[items]
        if floor is not None:
            scores[scores <= floor[:, None]] = -np.inf
        at = np.searchsorted(items, seen_items)  # items are sorted: remembered items as columns
        found = at < len(items)
        found[found] = items[at[found]] == seen_items[found]
        owner = np.repeat(np.arange(len(users)), np.diff(seen_start))
        scores[owner[found], at[found]] = -np.inf
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k] if len(items) <= k else None
        if best is None:
            best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            best = np.take_along_axis(best, np.argsort(-np.take_along_axis(scores, best, 1), axis=1, kind="stable"), 1)
        top_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
        top_rows = np.full((len(users), k), -1, dtype=np.int64)
        chosen = np.take_along_axis(scores, best, 1)
        keep = np.isfinite(chosen)
        top_scores[:, : best.shape[1]] = np.where(keep, chosen, -np.inf)
        top_rows[:, : best.shape[1]] = np.where(keep, items[best], -1)
        return top_rows, top_scores

    def _tail_possible(self, user_norms: np.ndarray, tail: np.ndarray, item_norms: np.ndarray, biases: np.ndarray,
                       top_scores: np.ndarray, floor: np.ndarray | None = None) -> np.ndarray:
        """Positions of the users whose tail (the items of the mask ``tail``) could beat their k-th hot
        score (and ``floor``), widest gap first (the bound: :func:`_norm_bands`)."""
        bar = top_scores[:, -1] if floor is None else np.maximum(top_scores[:, -1], floor)
        gap = self._score_bound(user_norms, tail, item_norms, biases) - bar
        need = np.flatnonzero(gap >= 0)
        return need[np.argsort(-gap[need], kind="stable")]

    @staticmethod
    def _score_bound(user_norms: np.ndarray, mask: np.ndarray, item_norms: np.ndarray, biases: np.ndarray
                     ) -> np.ndarray:
        """Per user, an upper bound on the score of any item of the mask (:func:`_norm_bands`),
        with float32 rounding slack."""
        band_norm, band_bias = _norm_bands(item_norms, biases, mask, _NORM_BANDS)
        bound = (band_bias[None, :] + user_norms[:, None].astype(np.float32) * band_norm[None, :]).max(axis=1)
        return bound + np.float32(1e-5) * (np.abs(bound) + np.float32(1.0))

    def _add_tail(self, users: np.ndarray, index: BuiltIndex, tail: np.ndarray, need: np.ndarray, Q: np.ndarray,
                  biases: np.ndarray, seen_start: np.ndarray, seen_items: np.ndarray, top_rows: np.ndarray,
                  top_scores: np.ndarray) -> int:
        """Merge the index's candidates among the ``tail`` items into the top-k of the users ``need``;
        returns the lookups made."""
        tail = tail[: min(index.annoy.get_n_items(), len(Q))]  # (rows the index's ids span)
        # A row whose item was forgotten since the build: the index's entry is the old item's.
        tail = tail & ~self.model.items_forgotten_after(index.model_version)[: len(tail)]
        for n in need.tolist():
            seen = seen_items[seen_start[n]:seen_start[n + 1]]
            fetch = self.k + min(len(seen), self.max_index_fetch)
            found = np.asarray(index.nearest(mips_query(users[n]), fetch, self.search_k), dtype=np.int64)
            found = found[tail[found]]
            if len(seen):
                found = found[~np.isin(found, seen)]
            if len(found):
                _merge_into(top_rows, top_scores, n, found, Q[found] @ users[n] + biases[found], len(found))
        return len(need)
