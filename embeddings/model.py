"""Online matrix factorisation over explicit and implicit feedback."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from recstream.embeddings.sgd import (
    MAX_COMPONENT,
    MAX_SCALAR,
    MEAN_RATING,
    ItemArrays,
    Shared,
    StepSizes,
    UserArrays,
    item_popularity,
    rows_finite,
    sgd_batch,
)
from recstream.embeddings.table import EmbeddingTable

log = logging.getLogger(__name__)


def _grown(array: np.ndarray, needed: int, fill: float = 0) -> np.ndarray:
    """``array`` with room for at least ``needed`` rows (capacity doubles), new rows set to ``fill``."""
    grown = np.full((max(needed, 2 * len(array)), *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


_REPLAY_RING = ("users", "items", "ratings")  # one array each; "state" holds write position, filled


def _drop_from_ring(columns: Sequence[np.ndarray], state: np.ndarray, drop: np.ndarray) -> None:
    """Remove the entries of a ring (``columns`` of one length, ``state`` its write position and
    fill) where the mask ``drop`` is set, keeping the others in order, oldest first, from slot 0.

    >>> ring, state = np.array([4, 5, 2, 3]), np.array([2, 4])  # oldest to newest: 2 3 4 5
    >>> _drop_from_ring([ring], state, ring == 4); ring.tolist(), state.tolist()
    ([2, 3, 5, 0], [3, 3])
    """
    position, filled = int(state[0]), int(state[1])
    capacity = len(columns[0])
    order = (np.arange(position, position + filled) % capacity) if filled == capacity else np.arange(filled)
    kept = order[~drop[order]]
    if len(kept) == filled:
        return
    for column in columns:
        values = column[kept]
        column[:] = 0
        column[: len(kept)] = values
    state[:] = (len(kept) % capacity, len(kept))


def _empty_replay_ring(capacity: int) -> dict[str, np.ndarray]:
    """The ring of recent ratings replayed for item vectors (see ``sgd_batch``)."""
    return {"users": np.zeros(capacity, dtype=np.int64), "items": np.zeros(capacity, dtype=np.int64),
            "ratings": np.zeros(capacity, dtype=np.float32), "state": np.zeros(2, dtype=np.int64)}


class _RowArray(NamedTuple):
    """A per-user or per-item array kept beside the embedding tables."""

    attr: str
    key: str | None  # name in the state arrays; None: derived on load, not stored
    dtype: type
    fill: float  # value of a new row
    vector: bool = False  # one ``dim``-wide vector per row, not a scalar
    added_later: bool = False  # states written before it existed lack it: it loads as ``fill``
    learned: bool = True  # False: bookkeeping, which the finiteness guard leaves alone
    reset_on_forget: bool = True  # False: kept across a forgotten id's row (it says when it was forgotten)


_USER_ARRAYS = (
    _RowArray("_short", "short_vectors", np.float32, 0, vector=True),  # recent-items vector
    _RowArray("_short_ts", "short_ts", np.int64, 0),  # event time of that vector
    _RowArray("_last_item", "last_item", np.int64, -1),  # last implicit item
    _RowArray("_user_events", "user_events", np.int64, 0, added_later=True),  # events of any kind
    _RowArray("_user_scale", "user_scale", np.float32, 1, added_later=True),  # how widely they use the rating scale
    _RowArray("_pop_taste", "popularity_taste", np.float32, 0, added_later=True),  # rating shift per log item count
    # For bounded memory (embeddings/expiry.py): event time of the user's latest event (expiry),
    # and its place in the input (events applied before it: least-recently-active eviction).
    _RowArray("_last_active", "last_active", np.int64, 0, added_later=True, learned=False),
    _RowArray("_last_seq", "last_seq", np.int64, 0, added_later=True, learned=False),
    # The input partition of the user's latest event: a partition's users go with it when it moves
    # to another member of the group (stream/handover.py). -1: unknown (replayed from a file).
    _RowArray("_input_partition", "input_partition", np.int32, -1, added_later=True, learned=False),
)
_ITEM_ARRAYS = (
    _RowArray("_item_seq", "item_seq", np.int64, 0),  # model version of the item's last change
    _RowArray("_item_events", "item_events", np.int64, 0),  # events of any kind
    _RowArray("_transition", "transition_vectors", np.float32, 0, vector=True),  # where users go next
    _RowArray("_pool_count", None, np.int64, 0, learned=False),  # entries in the negative pool (rebuilt from the ring)
    # Bounded memory for items, as for users (see _USER_ARRAYS).
    _RowArray("_item_last_active", "item_last_active", np.int64, 0, added_later=True, learned=False),
    _RowArray("_item_last_seq", "item_last_seq", np.int64, 0, added_later=True, learned=False),
    # Model version at which the row's item was last forgotten (0: never): an index built before
    # holds another item at that row (see items_forgotten_after). Not stored: after a restart
    # every index is built anew.
    _RowArray("_item_forgotten_at", None, np.int64, 0, learned=False, reset_on_forget=False),
)


def _resized_ring(ring: np.ndarray, state: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """A ring buffer (the recent positives, or one column of the recent ratings) at ``capacity``,
    keeping its newest entries and its dtype (a changed ``model.negative_pool`` or
    ``rating_replay_pool`` keeps a state usable; the same size keeps it bit-identical).

    >>> _resized_ring(np.array([4, 5, 2, 3]), np.array([2, 4]), 3)  # oldest to newest: 2 3 4 5
    (array([3, 4, 5]), array([0, 3]))
    >>> _resized_ring(np.array([4.5, 0.5]), np.array([0, 2]), 3)[0]
    array([4.5, 0.5, 0. ])
    """
    position, filled = int(state[0]), int(state[1])
    if len(ring) == capacity:
        return ring.copy(), np.array([position, filled], dtype=np.int64)
    ordered = np.concatenate([ring[position:], ring[:position]]) if filled == len(ring) else ring[:filled]
    kept = ordered[-capacity:]
    resized = np.zeros(capacity, dtype=ring.dtype)
    resized[: len(kept)] = kept
    return resized, np.array([len(kept) % capacity, len(kept)], dtype=np.int64)


def epoch_rate_scale(epoch: int, epochs: int) -> float:
    """Step-size factor for pass ``epoch`` (from 0) of ``epochs`` over a log: a linear decay.

    One pass learns at full rate; several passes end with small steps, as
    word2vec's passes do, so the last pass refines instead of adding noise
    (Last.fm split, 10 unweighted passes: NDCG@10 0.150 at a constant rate, 0.182 decayed).

    >>> [epoch_rate_scale(e, 4) for e in range(4)]
    [1.0, 0.75, 0.5, 0.25]
    """
    return 1.0 - epoch / epochs


@dataclass(frozen=True)
class MFConfig:
    """Hyper-parameters of :class:`OnlineMF` (the ``[model]`` config section)."""

    dim: int = 32
    learning_rate: float = 0.08
    # Items with few events learn faster: their rate falls from this to learning_rate as
    # their events pass new_item_events (see sgd_batch).
    new_item_learning_rate: float = 0.2
    new_item_events: float = 10.0
    transition_learning_rate: float = 0.2  # the sequence signal's per-item transition vectors
    # Rating biases are running means: step 1/(events + bias_prior_events), never below bias_learning_rate.
    bias_learning_rate: float = 0.05
    bias_prior_events: float = 5.0
    # Each user's rating scale multiplies the item part of a rating (0 keeps it at 1).
    rating_scale_learning_rate: float = 0.08
    rating_scale_regularization: float = 0.03
    # Each user's taste for well-known vs obscure items: a coefficient on the item's log event count.
    popularity_taste_learning_rate: float = 0.01
    popularity_taste_regularization: float = 0.05
    # Ranking adds popularity_weight * log1p(recent popularity): 1 is what the sampled negatives
    # took out; less favours personal over popular items.
    popularity_weight: float = 1.0
    regularization: float = 0.005
    n_negatives: int = 4
    init_std: float = 0.1  # item vectors start N(0, init_std^2)
    # User vectors start at the origin: they are learned from the items a user touches, and a
    # random start only adds noise to their first predictions (MovieLens RMSE 0.8509 -> 0.8493,
    # implicit HR@10 0.0880 -> 0.0876: see the README).
    user_init_std: float = 0.0
    seed: int = 42
    negative_pool: int = 8192
    # Ratings: each one also steps the item vectors of rating_replay_steps ratings drawn from the
    # last rating_replay_pool (0 steps turns it off). One pass leaves item vectors under-trained:
    # MovieLens RMSE 0.8493 -> 0.8471 (see sgd_batch and the README).
    rating_replay_steps: int = 4
    rating_replay_pool: int = 4096
    rating_replay_learning_rate: float = 0.05
    rating_replay_regularization: float = 0.1
    # Short-term interest (implicit events): weight of the recent-items vector when ranking
    # (0 turns it off), how fast it fades in event time, and how much of it each event keeps.
    short_term_weight: float = 3.0
    short_term_half_life_s: float = 1800.0
    short_term_keep: float = 0.8
    # Ratings are learned in units of this many points: the step sizes above suit errors of a few
    # units (1-5 stars). Another scale learns as well with its own unit (0-10: 2, 0-100: 20);
    # without one the kernel's bounds (sgd.MAX_*) still keep every value finite, but learning
    # is poor. Biases, mean and predictions are reported in the ratings' own units.
    rating_unit: float = 1.0
    # Session signals (embeddings.session): a session is a user's events with one session_id, or
    # gaps under session_gap_s; its last session_length clicks are kept. Sequential rules count
    # "x followed y" within session_rules_window clicks (gain 1/gap) and are read from the last
    # session_query_window clicks; rules and co-occurrence keep session_neighbours items per item,
    # halved every session_half_life_s of event time (0: no decay). The neighbourhood is V-SKNN
    # over a ring of session_ring recent sessions, session_per_item per item, the
    # session_knn_sample most recent sharing an item, session_knn_k nearest. Ranking adds
    # session_*_weight times each signal (all 0 turns them off).
    session_gap_s: float = 1800.0
    session_length: int = 20
    session_rules_window: int = 2
    session_query_window: int = 1
    session_neighbours: int = 32
    session_half_life_s: float = 2_592_000.0  # 30 days
    session_ring: int = 10_000
    session_per_item: int = 64
    session_knn_sample: int = 1000
    session_knn_k: int = 100
    session_rules_weight: float = 1.0
    session_cooc_weight: float = 0.3
    session_knn_weight: float = 1.0
    session_repeat_weight: float = 2.0  # times the measured odds that a next click is a re-view
    session_mf_weight: float = 0.01
    # Bounded memory (embeddings/expiry.py): a user without an event for user_ttl_s of event time
    # is forgotten (0: never), and at most max_users are held (0: no cap), the least recently
    # active forgotten first. A forgotten user's row goes to the next new user.
    max_users: int = 0
    user_ttl_s: float = 0.0
    # The same for items (max_items, item_ttl_s): a forgotten item leaves every user's history,
    # session and candidate list, and is never recommended again (see OnlineMF.forget_items).
    max_items: int = 0
    item_ttl_s: float = 0.0


class OnlineMF:
    """User and item embeddings learned one event at a time, a batch per call.

    Explicit events (with a rating) fit
    ``mu + b_u + t_u * (log1p(n_i) - 2) + s_u * (b_i + p_u . q_i)`` to the
    rating (see ``sgd_batch``); implicit events (no rating) fit ``sigmoid(b_i + p_u . q_i)`` to 1
    for the item and to 0 for sampled negatives. Applying the same events in
    the same order with the same seed gives bit-identical state, however they
    are cut into batches.

    >>> import numpy as np
    >>> mf = OnlineMF(MFConfig(dim=8, seed=1))
    >>> mf.learn(["ann"] * 50, ["jazz"] * 50, ratings=np.full(50, 4.5, dtype=np.float32))
    >>> round(float(mf.predict_rating("ann", "jazz")), 1)
    4.5
    >>> mf.model_version, len(mf.users), len(mf.items)
    (1, 1, 1)
    """

    def __init__(self, config: MFConfig = MFConfig()) -> None:
        self.config = config
        self.users = EmbeddingTable(config.dim, config.user_init_std, config.seed)
        self.items = EmbeddingTable(config.dim, config.init_std, config.seed + 1)
        self._mean_state = np.zeros(4, dtype=np.float64)  # running mean rating, count; mean implicit weight, count
        self._rng_state = np.array([config.seed], dtype=np.uint64)
        self._negative_pool = np.zeros(config.negative_pool, dtype=np.int64)
        self._negative_pool_state = np.zeros(2, dtype=np.int64)  # write position, filled
        self._replay = _empty_replay_ring(config.rating_replay_pool)
        for spec in _USER_ARRAYS + _ITEM_ARRAYS:
            shape = (1024, config.dim) if spec.vector else (1024,)
            setattr(self, spec.attr, np.full(shape, spec.fill, dtype=spec.dtype))
        self.model_version = 0
        self.events_applied = 0
        self.non_finite_resets = 0  # users/items reset by the finiteness guard (see _reset_non_finite)
        # Called with the rows of forgotten items (see forget_items): anything kept per item row
        # outside the model registers here to drop them before the rows are reused.
        self.item_forget_hooks: list[Callable[[np.ndarray], None]] = []

    @property
    def global_mean(self) -> float:
        return float(self._mean_state[MEAN_RATING]) * self.config.rating_unit

    def learn(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        ratings: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        """Learn a batch of events given by external ids (see :meth:`learn_rows`)."""
        n = len(user_ids)
        self.learn_rows(
            self.users.rows(user_ids),
            self.items.rows(item_ids),
            np.full(n, np.nan, dtype=np.float32) if ratings is None else ratings,
            np.ones(n, dtype=np.float32) if weights is None else weights,
        )

    def learn_rows(
        self, user_rows: np.ndarray, item_rows: np.ndarray, ratings: np.ndarray, weights: np.ndarray,
        predictions: np.ndarray | None = None, timestamps: np.ndarray | None = None, rate_scale: float = 1.0,
    ) -> float:
        """Apply events in order: NaN rating = implicit with that weight. Returns the batch loss.

        ``predictions`` (float64, one per event), if given, receives each event's prediction
        made before learning from it. ``timestamps`` (epoch ms) drive the fading of short-term
        interest; without them events are taken as simultaneous. ``rate_scale`` multiplies
        every step size (passes over a log decay it: see :func:`epoch_rate_scale`).
        """
        if len(user_rows) == 0:
            return 0.0
        if predictions is None:
            predictions = np.empty(len(user_rows), dtype=np.float64)
        if timestamps is None:
            timestamps = np.zeros(len(user_rows), dtype=np.int64)
        unit = self.config.rating_unit
        if unit != 1.0:
            ratings = np.asarray(ratings, dtype=np.float32) / np.float32(unit)
        self._fit_user_arrays()
        self._fit_item_arrays()
        self.model_version += 1
        P, bu = self.users.storage
        Q, bi = self.items.storage
        cfg = self.config
        per_user = UserArrays(vectors=P, biases=bu, events=self._user_events, short=self._short,
                              short_ts=self._short_ts, last_item=self._last_item, scale=self._user_scale,
                              pop_taste=self._pop_taste)
        per_item = ItemArrays(vectors=Q, biases=bi, changed=self._item_seq, events=self._item_events,
                              transitions=self._transition, pool_count=self._pool_count)
        shared = Shared(means=self._mean_state, rng=self._rng_state, positives=self._negative_pool,
                        positives_state=self._negative_pool_state, replay_users=self._replay["users"],
                        replay_items=self._replay["items"], replay_ratings=self._replay["ratings"],
                        replay_state=self._replay["state"])
        rates = StepSizes(
            lr=np.float32(cfg.learning_rate * rate_scale),
            lr_new=np.float32(cfg.new_item_learning_rate * rate_scale),
            new_events=np.float32(cfg.new_item_events),
            lr_seq=np.float32(cfg.transition_learning_rate * rate_scale),
            lr_bias=np.float32(cfg.bias_learning_rate * rate_scale),
            bias_prior=np.float32(cfg.bias_prior_events),
            rate_scale=np.float32(rate_scale),
            reg=np.float32(cfg.regularization),
            lr_scale=np.float32(cfg.rating_scale_learning_rate * rate_scale),
            scale_reg=np.float32(cfg.rating_scale_regularization),
            lr_taste=np.float32(cfg.popularity_taste_learning_rate * rate_scale),
            taste_reg=np.float32(cfg.popularity_taste_regularization),
            lr_replay=np.float32(cfg.rating_replay_learning_rate * rate_scale),
            replay_reg=np.float32(cfg.rating_replay_regularization),
            short_keep=float(cfg.short_term_keep),
            short_half_life_ms=float(cfg.short_term_half_life_s * 1000.0),
            n_negatives=int(cfg.n_negatives),
            replay_steps=int(cfg.rating_replay_steps),
        )
        loss = sgd_batch(per_user, per_item, shared, rates, user_rows, item_rows,
                         np.ascontiguousarray(ratings, dtype=np.float32),
                         np.ascontiguousarray(weights, dtype=np.float32),
                         np.ascontiguousarray(timestamps, dtype=np.int64), self.model_version, predictions)
        self.events_applied += len(user_rows)
        if unit != 1.0:
            explicit = ~np.isnan(ratings)
            predictions[explicit] *= unit
            loss *= unit * unit
        self._reset_non_finite(user_rows)
        return float(loss)

    def _reset_non_finite(self, user_rows: np.ndarray) -> None:
        """The backstop behind the kernel's bounds (``sgd.MAX_*``): after a batch, a user or item
        whose learned values are not all finite is reset to a new id's state, with an error in the
        log, rather than spreading NaN to everyone it meets, into the index and into checkpoints.
        Checks only the batch's users and the items it moved, vectorised: it runs on every batch."""
        P, bu = self.users.storage
        Q, bi = self.items.storage
        items = np.flatnonzero(self._item_seq[: len(self.items)] == self.model_version)
        mean_ok = bool(np.isfinite(self._mean_state).all())
        # The common case, fast: raw bits of the rows, no copies (see rows_finite).
        checks = (((P, self._short, bu, self._user_scale, self._pop_taste), user_rows),
                  ((Q, self._transition, bi), items))
        if mean_ok and all(rows_finite(a.reshape(len(a), -1).view(np.uint32), rows)
                           for arrays, rows in checks for a in arrays):
            return
        users_ok = (np.isfinite(P[user_rows].sum(axis=1) + bu[user_rows] + self._short[user_rows].sum(axis=1)
                                + self._user_scale[user_rows] + self._pop_taste[user_rows]))
        items_ok = np.isfinite(Q[items].sum(axis=1) + bi[items] + self._transition[items].sum(axis=1))
        bad_users, bad_items = np.unique(user_rows[~users_ok]), items[~items_ok]
        self.non_finite_resets += len(bad_users) + len(bad_items) + (not mean_ok)
        log.error("non-finite state after a batch: reset %d user(s), %d item(s)%s to a new id's state "
                  "(refusing to keep NaN/inf: it would spread to every vector it meets)",
                  len(bad_users), len(bad_items), "" if mean_ok else " and the running means")
        P[bad_users] = self.users.initial_vectors(bad_users)
        bu[bad_users] = 0
        Q[bad_items] = self.items.initial_vectors(bad_items)
        bi[bad_items] = 0
        for spec in _USER_ARRAYS:
            if spec.learned:
                getattr(self, spec.attr)[bad_users] = spec.fill
        for spec in _ITEM_ARRAYS:
            if spec.learned:
                getattr(self, spec.attr)[bad_items] = spec.fill
        self._item_seq[bad_items] = self.model_version
        if not mean_ok:
            self._mean_state[:] = 0.0

    def forget_users(self, rows: np.ndarray) -> None:
        """Forget the users of ``rows``: their ids, learned values and ratings in the replay ring.
        Their rows then hold exactly what a new user's row holds, ready for the next new id."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        self._fit_user_arrays()
        self.users.forget(rows)
        for spec in _USER_ARRAYS:
            getattr(self, spec.attr)[rows] = spec.fill
        # Their ratings would step items against whoever gets the row next.
        _drop_from_ring([self._replay[key] for key in _REPLAY_RING], self._replay["state"],
                        np.isin(self._replay["users"], rows))

    def forget_items(self, rows: np.ndarray) -> None:
        """Forget the items of ``rows`` everywhere the model refers to them: ids, learned values,
        users' last items, the ring of recent positives (negative samples, popularity) and the
        rating-replay ring; then every callback of :attr:`item_forget_hooks` gets ``rows`` (what
        is kept per item outside the model: histories, sessions, content; see stream.state).
        A forgotten item's row then holds what a new item's row holds (its versions aside), for
        the next new id; it counts as changed, and :meth:`items_forgotten_after` tells an index
        built before that its entry for the row is someone else's.
        """
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) == 0:
            return
        self._fit_item_arrays()
        self._fit_user_arrays()
        self.model_version += 1
        self.items.forget(rows)
        for spec in _ITEM_ARRAYS:
            if spec.reset_on_forget:
                getattr(self, spec.attr)[rows] = spec.fill
        self._item_seq[rows] = self.model_version
        self._item_forgotten_at[rows] = self.model_version
        last = self._last_item[: len(self.users)]
        last[np.isin(last, rows)] = -1  # (where their last item leads: the next item of the row would mislead)
        _drop_from_ring([self._negative_pool], self._negative_pool_state, np.isin(self._negative_pool, rows))
        _drop_from_ring([self._replay[key] for key in _REPLAY_RING], self._replay["state"],
                        np.isin(self._replay["items"], rows))
        for hook in self.item_forget_hooks:
            hook(rows)

    def touch_items(self, rows: np.ndarray, now_ms: int | None = None) -> None:
        """Count items as active now though no event of theirs was applied here (their metadata
        came, or another member's changes): at event time ``now_ms`` (default: the newest item
        activity, which is the expiry clock) and the input's current place, so the item expiry
        and eviction do not take them first."""
        last_active, last_seq = self.item_activity()
        if now_ms is None:
            now_ms = int(last_active[: len(self.items)].max(initial=0))
        last_active[rows] = np.maximum(last_active[rows], now_ms)
        last_seq[rows] = np.maximum(last_seq[rows], self.events_applied)

    def items_forgotten_after(self, model_version: int) -> np.ndarray:
        """Per item row: was its item forgotten after ``model_version`` (an index built at that
        version holds another item, or none, at the row)?"""
        self._fit_item_arrays()
        return self._item_forgotten_at[: len(self.items)] > model_version

    def item_activity(self) -> tuple[np.ndarray, np.ndarray]:
        """Per item row, as :meth:`activity` per user: event time of its latest event, and its place in the input."""
        self._fit_item_arrays()
        return self._item_last_active, self._item_last_seq

    def user_state(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """A copy of what the model holds for the users of ``rows``, by name (``vectors``, ``biases``
        and the per-user arrays' state keys; ``last_item`` holds item rows)."""
        self._fit_user_arrays()
        out = {"vectors": self.users.vectors[rows].copy(), "biases": self.users.biases[rows].copy()}
        out.update({spec.key: getattr(self, spec.attr)[rows].copy() for spec in _USER_ARRAYS if spec.key})
        return out

    def user_state_dtype(self, name: str) -> np.dtype:
        """The dtype of :meth:`user_state`'s array ``name`` (a KeyError for an unknown name)."""
        if name in ("vectors", "biases"):
            return np.dtype(np.float32)
        return np.dtype(next(spec.dtype for spec in _USER_ARRAYS if spec.key == name))

    def set_user_state(self, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Give the users of ``rows`` the state ``values`` (as :meth:`user_state` returns it; names it
        lacks keep their value). Non-finite values are refused: they would spread to every item."""
        for name, array in values.items():
            if np.asarray(array).dtype.kind == "f" and not np.isfinite(array).all():
                raise ValueError(f"user state {name!r} holds NaN or inf")
        self._fit_user_arrays()
        self.users.vectors[rows] = np.clip(values["vectors"], -MAX_COMPONENT, MAX_COMPONENT)
        if "biases" in values:
            self.users.biases[rows] = np.clip(values["biases"], -MAX_SCALAR, MAX_SCALAR)
        for spec in _USER_ARRAYS:
            if spec.key in values:
                getattr(self, spec.attr)[rows] = values[spec.key]

    def input_partitions(self) -> np.ndarray:
        """Per user row: the input partition of the user's latest event (-1: unknown), writable."""
        self._fit_user_arrays()
        return self._input_partition

    def activity(self) -> tuple[np.ndarray, np.ndarray]:
        """Per user row: event time of their latest event, and its place in the input (events
        applied up to it); updated by the caller that knows the events' places (stream.state)."""
        self._fit_user_arrays()
        return self._last_active, self._last_seq

    def latest_event_ms(self) -> int:
        """The latest event time any user's short-term interest holds (0: none had a time)."""
        return int(self._short_ts[: len(self.users)].max(initial=0))

    def _fit_user_arrays(self) -> None:
        self._fit_arrays(_USER_ARRAYS, len(self.users))

    def _fit_item_arrays(self) -> None:
        self._fit_arrays(_ITEM_ARRAYS, len(self.items))

    def _fit_arrays(self, specs: tuple[_RowArray, ...], rows: int) -> None:
        if rows > len(getattr(self, specs[0].attr)):
            for spec in specs:
                setattr(self, spec.attr, _grown(getattr(self, spec.attr), rows, spec.fill))

    def interaction_counts(self, item_rows: np.ndarray) -> np.ndarray:
        """Events (of any kind) learned so far on each of ``item_rows``."""
        self._fit_item_arrays()
        return self._item_events[item_rows]

    def set_item_rows(self, item_rows: np.ndarray, vectors: np.ndarray, biases: np.ndarray) -> None:
        """Overwrite items' vectors and biases (e.g. from content); they count as changed."""
        self._fit_item_arrays()
        self.model_version += 1
        Q, bi = self.items.storage
        Q[item_rows] = vectors
        bi[item_rows] = biases
        self._item_seq[item_rows] = self.model_version

    def item_transitions(self, rows: np.ndarray | slice) -> np.ndarray:
        """Items' transition vectors ("where users go next", see ``sgd_batch``): a copy."""
        self._fit_item_arrays()
        return self._transition[rows].copy()

    def add_item_deltas(self, rows: np.ndarray, vectors: np.ndarray, transitions: np.ndarray, biases: np.ndarray,
                        events: np.ndarray) -> None:
        """Add changes learned elsewhere (another member of the group, see embeddings.sync) to
        items; sums are clipped to the kernel's bounds and the items count as changed."""
        self._fit_item_arrays()
        self.model_version += 1
        Q, bi = self.items.storage
        # np.add.at: an id twice among ``rows`` adds twice, as two messages would.
        np.add.at(Q, rows, vectors)
        np.add.at(self._transition, rows, transitions)
        np.add.at(bi, rows, biases)
        np.add.at(self._item_events, rows, events)
        Q[rows] = np.clip(Q[rows], -MAX_COMPONENT, MAX_COMPONENT)
        self._transition[rows] = np.clip(self._transition[rows], -MAX_COMPONENT, MAX_COMPONENT)
        bi[rows] = np.clip(bi[rows], -MAX_SCALAR, MAX_SCALAR)
        self._item_events[rows] = np.maximum(self._item_events[rows], 0)
        self._item_seq[rows] = self.model_version
        # The group still uses them: item expiry and eviction count them as active here too.
        self.touch_items(rows)

    # -- state ------------------------------------------------------------------------------

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything learning depends on, as named arrays (views: copy or write them out at once)."""
        out = {f"users.{k}": v for k, v in self.users.to_arrays().items()}
        out.update({f"items.{k}": v for k, v in self.items.to_arrays().items()})
        out.update({
            "mean_state": self._mean_state,
            "rng_state": self._rng_state,
            "negative_pool": self._negative_pool,
            "negative_pool_state": self._negative_pool_state,
            "counters": np.array([self.model_version, self.events_applied], dtype=np.int64),
        })
        out.update({f"rating_replay.{k}": v for k, v in self._replay.items()})
        for specs, rows in ((_USER_ARRAYS, len(self.users)), (_ITEM_ARRAYS, len(self.items))):
            out.update({spec.key: getattr(self, spec.attr)[:rows] for spec in specs if spec.key})
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_arrays` output; raises ValueError if it does not fit this config."""
        self.users.load_arrays({k[6:]: v for k, v in arrays.items() if k.startswith("users.")})
        self.items.load_arrays({k[6:]: v for k, v in arrays.items() if k.startswith("items.")})
        self._mean_state = np.zeros(4, dtype=np.float64)
        self._mean_state[: len(arrays["mean_state"])] = arrays["mean_state"]  # older states hold only the rating mean
        self._rng_state = np.array(arrays["rng_state"], dtype=np.uint64)
        self._negative_pool, self._negative_pool_state = _resized_ring(
            np.asarray(arrays["negative_pool"], dtype=np.int64), np.asarray(arrays["negative_pool_state"]),
            self.config.negative_pool)
        self._replay = _empty_replay_ring(self.config.rating_replay_pool)
        if "rating_replay.state" in arrays:  # states written before the replay have none: it starts empty
            for key in _REPLAY_RING:
                ring, self._replay["state"] = _resized_ring(
                    np.asarray(arrays[f"rating_replay.{key}"]), np.asarray(arrays["rating_replay.state"]),
                    self.config.rating_replay_pool)
                self._replay[key] = ring.astype(self._replay[key].dtype, copy=False)
        # Stored arrays are exactly as long as the tables; growing gives them their spare capacity.
        for specs, rows in ((_USER_ARRAYS, len(self.users)), (_ITEM_ARRAYS, len(self.items))):
            for spec in specs:
                shape = (rows, self.config.dim) if spec.vector else (rows,)
                if spec.key is None or (spec.added_later and spec.key not in arrays):
                    stored = np.full(shape, spec.fill, dtype=spec.dtype)
                else:
                    stored = np.array(arrays[spec.key], dtype=spec.dtype).reshape(shape)
                setattr(self, spec.attr, _grown(stored, 1024, spec.fill))
        filled = int(self._negative_pool_state[1])
        self._pool_count[: len(self.items)] = np.bincount(self._negative_pool[:filled], minlength=len(self.items))
        self.model_version, self.events_applied = (int(x) for x in arrays["counters"])

    def items_changed_since(self, model_version: int) -> np.ndarray:
        """Rows of items whose vector or bias moved after ``model_version``."""
        self._fit_item_arrays()
        return np.flatnonzero(self._item_seq[: len(self.items)] > model_version)

    def recently_popular(self) -> np.ndarray:
        """Rows of the items in the ring of recent positives (the ones ranking boosts by popularity)."""
        self._fit_item_arrays()
        return np.flatnonzero(self._pool_count[: len(self.items)])

    def query_vectors(self, user_rows: np.ndarray, now_ms: int | np.ndarray = 0) -> np.ndarray:
        """The vectors to rank items with: long-term, plus where the last item leads, plus short-term
        interest, the last two faded by the time since the user's last event.

        ``now_ms`` (one time, or one per user) is the event time to fade to; 0 means
        "at each user's last event", with no fading.
        """
        self._fit_user_arrays()  # users created since the last batch have no short-term state yet
        vectors = self.users.vectors[user_rows].copy()
        short_ts = self._short_ts[user_rows]
        elapsed = np.maximum(np.asarray(now_ms, dtype=np.int64) - short_ts, 0) if np.any(now_ms) else 0
        half_life_ms = self.config.short_term_half_life_s * 1000.0
        fade = np.broadcast_to(np.exp2(-elapsed / half_life_ms) if half_life_ms > 0 else 1.0,
                               (len(user_rows),)).astype(np.float32)
        # Where the user's last item leads (only when that event had a time: see sgd_batch).
        last = self._last_item[user_rows]
        sequenced = (last >= 0) & (short_ts > 0)
        vectors[sequenced] += fade[sequenced, None] * self._transition[last[sequenced]]
        weight = self.config.short_term_weight
        if weight:
            vectors += (weight * fade)[:, None] * self._short[user_rows]
        return vectors

    def ranking_biases(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Per-item term of the ranking score ``b_i + w * log1p(pool count of i) + p_u . q_i``.

        Negatives are drawn from the pool of recent positives, so ``b_i`` learns
        popularity minus recent popularity; the log of the item's entries in
        that pool puts recent popularity back (on MovieLens in time order this
        beat the all-time count, HR@10 0.092 against 0.087); ``w`` is
        ``config.popularity_weight``. It changes only when the item enters or
        leaves the pool, and both mark the item changed, so an index built with
        it is stale exactly for the items that changed.
        """
        self._fit_item_arrays()
        rows = slice(0, len(self.items)) if rows is None else rows
        popularity = np.log1p(self._pool_count[rows]).astype(np.float32)
        return self.items.biases[rows] + np.float32(self.config.popularity_weight) * popularity

    def predict_rating(self, user_id: str, item_id: str) -> float:
        """Explicit-feedback prediction; unknown ids fall back to the biases/mean."""
        u, i = self.users.ids.get(user_id), self.items.ids.get(item_id)
        self._fit_user_arrays()
        item_part = 0.0
        if i is not None:
            item_part += float(self.items.biases[i])
        if u is not None and i is not None:
            item_part += float(self.users.vectors[u] @ self.items.vectors[i])
        unit = self.config.rating_unit
        if u is None:
            return self.global_mean + item_part * unit
        taste = 0.0
        if i is not None:
            self._fit_item_arrays()
            taste = float(self._pop_taste[u]) * item_popularity(float(self._item_events[i]))
        return self.global_mean + unit * (float(self.users.biases[u]) + taste + float(self._user_scale[u]) * item_part)
