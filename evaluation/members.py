"""One model learned by a consumer group, simulated in one process: ``recstream eval --members N``.

The service scales out as a Kafka consumer group: each member learns from the partitions it
owns, and item state is shared by exchanging per-item deltas (``embeddings.sync``). This module
measures what that costs in quality, with the same code paths and none of the broker:

- the log's events are split among ``N`` members by a stable hash of the user id
  (``embeddings.table.id_hashes`` modulo ``N``). Kafka's default partitioner keys a message by
  murmur2 of its key modulo the partitions, and the group then hands partitions to members; any
  stable hash of the user id gives the same picture: each user is learned by one member, users
  spread about evenly, and items are learned everywhere;
- each member has its own state and learns its own events in log order, through the learning
  code the single-process evaluation uses (``OnlineMF.learn_rows`` for ratings,
  ``RecState.learn_rows`` for implicit events, see evaluation.prequential);
- every ``sync_every`` events of the global stream, every member that learned since the last
  exchange takes its deltas (``ItemSync.take``), encodes them to the bytes that would go to the
  sync topic, and every other member decodes and applies them (``ItemDelta.decode``,
  ``ItemSync.apply``). ``sync_every=0`` never exchanges: each member alone;
- prequentially, each event is predicted (or ranked) by the member that owns its user, before
  that member learns it. The metrics are the single process's (MAE/RMSE, HR@10/NDCG@10).

One member sends nothing and receives nothing, so ``--members 1`` is exactly the single
process (a test holds it to that).

``sync_every`` is in events of the whole group's stream; the service sends on a clock
(``sync.interval_s``, 5 s by default) and applies what arrives at once, so
``K = sync.interval_s x events per second of the group``. The default, ``DEFAULT_SYNC_EVERY``
= 5,000, is the default 5 s at 1,000 events/s (at 5,000 events/s, K = 25,000); docs/scale-out.md
has the table of quality against ``K``. Here all members send at the same moment, so a delta is
0 to K events old when applied; in the service, sends are spread over the interval. The session
clicks also go out alone between two sends, every ``clicks_every`` events (the service's
``sync.clicks_interval_s``: :func:`clicks_every_for`).

>>> import numpy as np
>>> from recstream.evaluation.prequential import Interactions
>>> from recstream.embeddings.model import MFConfig
>>> users = [f"u{n % 20}" for n in range(400)]
>>> items = [f"i{(n * 7) % 30}" for n in range(400)]
>>> ratings = np.array([1 + (n * 7) % 30 % 5 for n in range(400)], dtype=np.float32)
>>> data = Interactions(users, items, ratings, np.ones(400, np.float32))
>>> config = MFConfig(dim=4)
>>> one = members_explicit(data, config, members=1, sync_every=10)
>>> from recstream.evaluation.prequential import prequential_explicit
>>> one.metrics["mae"] == prequential_explicit(data, config).metrics["mae"]
True
>>> four = members_explicit(data, config, members=4, sync_every=10)
>>> four.metrics["members"], four.metrics["syncs"], four.metrics["sync_messages"] > 0
(4, 40, True)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.embeddings.sync import ItemDelta, ItemSync
from recstream.embeddings.table import id_hashes
from recstream.evaluation.prequential import EvalResult, Interactions, explicit_result, prequential_implicit

if TYPE_CHECKING:
    from recstream.stream.state import RecState

DEFAULT_SYNC_EVERY = 5000  # events: see the module docstring


def clicks_every_for(sync_every: int, interval_s: float = 5.0, clicks_interval_s: float = 0.1) -> int:
    """Events between two exchanges of session clicks when items are exchanged every ``sync_every``
    (0: never), in the ratio of the service's ``sync.clicks_interval_s`` to ``sync.interval_s``
    (the defaults).

    >>> clicks_every_for(5000), clicks_every_for(1), clicks_every_for(0)
    (100, 1, 0)
    """
    return max(1, round(sync_every * clicks_interval_s / interval_s)) if sync_every else 0
_EXPLICIT_BATCH = 10_000  # events per learn call when no sync cuts them shorter (results do not depend on it)


def owners(user_ids: list[str], members: int) -> np.ndarray:
    """The member (0..members-1) that learns each event: a stable hash of its user id.

    >>> owners(["ann", "bob", "ann"], 1).tolist()
    [0, 0, 0]
    >>> a = owners(["ann", "bob", "ann"], 4); bool(a[0] == a[2])
    True
    """
    if members < 1:
        raise ValueError(f"members must be at least 1, not {members}")
    return (id_hashes(user_ids) % np.uint64(members)).astype(np.int64)


class MemberGroup:
    """The members' models, each with its side of the item sync, and the exchanges between them.

    ``exchange`` is what the sync topic does: every message a member takes is encoded once and
    decoded by each other member, as a Kafka consumer would receive it.
    """

    def __init__(self, models: list[OnlineMF], sync_every: int, sessions: list | None = None,
                 clicks_every: int | None = None) -> None:
        if sync_every < 0:
            raise ValueError(f"sync_every must be 0 (never) or a positive number of events, not {sync_every}")
        self.models = models
        self.sync_every = sync_every
        # The session clicks alone, between item exchanges (the service's sync.clicks_interval_s).
        self.clicks_every = clicks_every if clicks_every is not None else sync_every
        self.syncs = [ItemSync(model, f"member-{k}", sessions[k] if sessions else None)
                      for k, model in enumerate(models)]
        self._learned: set[int] = set()  # members that learned since the last exchange
        self.exchanges = 0
        self.click_exchanges = 0
        self.messages = 0
        self.bytes = 0
        self.items_sent = 0
        self.unranked = 0  # evaluated events whose item the owner had not heard of (implicit)

    def learned(self, member: int) -> None:
        """``member`` learned something since the last exchange."""
        self._learned.add(member)

    def applied(self, events: int) -> None:
        """``events`` of the group's stream are now learned: exchange if a sync is due."""
        if self.sync_every and events % self.sync_every == 0:
            self.exchange()
        elif self.sync_every and self.clicks_every and events % self.clicks_every == 0:
            self.exchange(items=False)

    def exchange(self, items: bool = True) -> None:
        # A member that learned nothing since its last send has nothing to send (what it received
        # moved its base with its vectors), so only the others are asked.
        sent = [(k, m.encode()) for k in sorted(self._learned) for m in self.syncs[k].take(items=items)]
        if items:
            self._learned.clear()
        for k, sync in enumerate(self.syncs):
            for sender, data in sent:
                if sender != k:
                    sync.apply(ItemDelta.decode(data))
        if items:
            self.exchanges += 1
        else:
            self.click_exchanges += 1
        self.messages += len(sent)
        self.bytes += sum(len(data) for _, data in sent)
        self.items_sent = sum(sync.sent_items for sync in self.syncs)

    def metrics(self) -> dict[str, float]:
        return {"members": len(self.models), "sync_every": self.sync_every, "syncs": self.exchanges,
                "clicks_every": self.clicks_every, "click_syncs": self.click_exchanges,
                "sync_messages": self.messages, "sync_bytes": self.bytes, "sync_items": self.items_sent,
                "events_unknown_item": self.unranked}


class MemberStates(MemberGroup):
    """A group of the service's states (``RecState``), for the implicit evaluation: it asks which
    state ranks and learns event ``n`` and says when one was learned.

    Two experiments, not what the service does, measure what sharing more would buy:
    ``share_popularity``: ranking adds ``log1p`` of an item's entries in the ring of recent
    positives, and each member's ring holds only its own users' clicks; with it, a member ranks
    with its own live count plus the other members' counts as of the last exchange, as if
    ``ItemDelta`` carried pool-count changes. ``share_sessions``: all members learn into and
    rank from one set of session signals (rules, co-occurrence, session-kNN), at once: the most
    a sync of session signals could give.
    """

    def __init__(self, config: MFConfig, owner: np.ndarray, members: int, sync_every: int,
                 share_popularity: bool = False, share_sessions: bool = False, sync_sessions: bool = True,
                 clicks_every: int | None = None) -> None:
        from recstream.embeddings.session import SessionSignals
        from recstream.stream.state import RecState  # the service's state, as the single process uses

        self.states = [RecState(config, history_per_user=1_000_000) for _ in range(members)]
        # As the service (sync.sessions): the session clicks travel with the deltas.
        super().__init__([state.model for state in self.states], sync_every,
                         [state.sessions for state in self.states] if sync_sessions and not share_sessions else None,
                         clicks_every_for(sync_every) if clicks_every is None else clicks_every)
        self.owner = owner
        if share_sessions:
            shared, users, items = SessionSignals(config), _GroupIds(), _GroupIds()
            for state in self.states:
                state.sessions = _SharedSessions(shared, state.model, users, items)
        self.share_popularity = share_popularity
        self._item_index: dict[str, int] = {}  # item id -> one index for the whole group
        self._global_rows = [np.zeros(0, dtype=np.int64) for _ in range(members)]  # member row -> that index
        self._others = [np.zeros(0, dtype=np.float64) for _ in range(members)]  # others' pool counts, by row

    def state_of(self, n: int) -> RecState:
        return self.states[int(self.owner[n])]

    def event_learned(self, n: int) -> None:
        self.learned(int(self.owner[n]))
        self.applied(n + 1)

    def ranking_biases(self, n: int) -> np.ndarray:
        """The ranking's per-item term for event ``n``, by its owner (see ``OnlineMF.ranking_biases``)."""
        model = self.state_of(n).model
        if not self.share_popularity:
            return model.ranking_biases()
        others = self._others[int(self.owner[n])]
        count = _pool_counts(model).astype(np.float64)
        count[: len(others)] += others
        return model.items.biases[: len(model.items)] + np.float32(model.config.popularity_weight) * np.log1p(
            count).astype(np.float32)

    def exchange(self, items: bool = True) -> None:
        super().exchange(items)
        if not self.share_popularity or not items:
            return
        counts = []
        for k, model in enumerate(self.models):
            known = len(self._global_rows[k])
            new = [self._item_index.setdefault(i, len(self._item_index))
                   for i in model.items.ids.ids_of(range(known, len(model.items)))]
            self._global_rows[k] = np.concatenate([self._global_rows[k], np.array(new, dtype=np.int64)])
            counts.append(np.bincount(self._global_rows[k], weights=_pool_counts(model),
                                      minlength=len(self._item_index)))
        total = sum(np.pad(c, (0, len(self._item_index) - len(c))) for c in counts)
        for k, own in enumerate(counts):
            self._others[k] = (total - np.pad(own, (0, len(total) - len(own))))[self._global_rows[k]]


class _GroupIds:
    """Group-wide rows for ids (the shared session signals' keys)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []

    def rows(self, ids: list[str]) -> np.ndarray:
        for key in ids:
            if key not in self.index:
                self.index[key] = len(self.ids)
                self.ids.append(key)
        return np.array([self.index[key] for key in ids], dtype=np.int64)


class _SharedSessions:
    """One member's view of session signals shared by the group (the ``share_sessions``
    experiment): its rows become group-wide rows on the way in, and back on the way out."""

    def __init__(self, shared, model: OnlineMF, users: _GroupIds, items: _GroupIds) -> None:
        self.shared, self.model, self.users, self.items = shared, model, users, items

    @property
    def enabled(self) -> bool:
        return self.shared.enabled

    def update(self, user_rows: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray,
               session_keys: np.ndarray | None = None) -> None:
        self.shared.update(self.users.rows(self.model.users.ids.ids_of(user_rows.tolist())),
                           self.items.rows(self.model.items.ids.ids_of(item_rows.tolist())), timestamps, session_keys)

    @contextmanager
    def learning(self, user_rows: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray,
                 session_keys: np.ndarray | None = None) -> Iterator[None]:
        """``SessionSignals.learning``, learned at once: the id conversions read the member's model,
        which the block is learning."""
        self.update(user_rows, item_rows, timestamps, session_keys)
        yield

    def candidates(self, user_rows: np.ndarray, now_ms: int | np.ndarray = 0,
                   session_keys: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        users = self.users.rows(self.model.users.ids.ids_of(np.asarray(user_rows).tolist()))
        for rows, scores in self.shared.candidates(users, now_ms, session_keys):
            local = [self.model.items.ids.get(self.items.ids[r]) for r in rows.tolist()]
            known = np.array([r is not None for r in local], dtype=bool)  # items this member has not heard of
            out.append((np.array([r for r in local if r is not None], dtype=np.int64), scores[known]))
        return out


def _pool_counts(model: OnlineMF) -> np.ndarray:
    # The experiment reads the model's private ring counts (what ranking_biases takes the log of)
    # rather than add an accessor to the model for a measurement.
    model._fit_item_arrays()
    return model._pool_count[: len(model.items)]


def members_explicit(data: Interactions, config: MFConfig, members: int,
                     sync_every: int = DEFAULT_SYNC_EVERY) -> EvalResult:
    """MAE/RMSE of predict-then-learn, each rating by the member that owns its user."""
    owner = owners(data.user_ids, members)
    group = MemberGroup([OnlineMF(config) for _ in range(members)], sync_every)
    predictions = np.empty(len(data), dtype=np.float64)
    step = sync_every or _EXPLICIT_BATCH
    started = time.perf_counter()
    for s in range(0, len(data), step):
        e = min(s + step, len(data))
        # Between two exchanges the members learn independently, so each takes its share of the
        # interval in one call, in log order.
        for k in np.unique(owner[s:e]).tolist():
            events = s + np.flatnonzero(owner[s:e] == k)
            model, picked = group.models[k], events.tolist()
            out = np.empty(len(events), dtype=np.float64)
            model.learn_rows(model.users.rows([data.user_ids[n] for n in picked]),
                             model.items.rows([data.item_ids[n] for n in picked]),
                             data.ratings[events], data.weights[events], out, data.timestamps[events])
            predictions[events] = out
            group.learned(k)
        group.applied(e)
    result = explicit_result(data, predictions, time.perf_counter() - started)
    result.metrics.update(group.metrics())
    return result


def members_implicit(data: Interactions, config: MFConfig, members: int, sync_every: int = DEFAULT_SYNC_EVERY,
                     share_popularity: bool = False, share_sessions: bool = False,
                     sync_sessions: bool = True, clicks_every: int | None = None) -> EvalResult:
    """HR@10/NDCG@10 of rank-then-learn, each event by the member that owns its user
    (``share_popularity``, ``share_sessions``: experiments, see :class:`MemberStates`;
    ``sync_sessions``: the service's ``sync.sessions``; ``clicks_every``: events between two
    exchanges of the clicks alone, default :func:`clicks_every_for`)."""
    group = MemberStates(config, owners(data.user_ids, members), members, sync_every, share_popularity,
                         share_sessions, sync_sessions, clicks_every)
    result = prequential_implicit(data, config, "model", group=group)
    result.metrics.update(group.metrics())
    return result


def describe(metrics: dict[str, float]) -> str:
    """One line on the group's exchanges, for the command line.

    >>> describe({"members": 4, "sync_every": 0, "syncs": 0, "sync_bytes": 0, "events_unknown_item": 7})
    '4 members, never synced: 0 exchanges, 0.0 MB of deltas; 7 events on items their owner had not heard of'
    """
    every = "never synced" if not metrics["sync_every"] else f"sync every {int(metrics['sync_every']):,} events"
    line = (f"{int(metrics['members'])} members, {every}: {int(metrics['syncs']):,} exchanges, "
            f"{metrics['sync_bytes'] / 1e6:.1f} MB of deltas")
    if metrics.get("events_unknown_item"):
        line += f"; {int(metrics['events_unknown_item']):,} events on items their owner had not heard of"
    return line


def evaluate(data: Interactions, config: MFConfig, mode: str, members: int,
             sync_every: int = DEFAULT_SYNC_EVERY, sync_sessions: bool = True,
             clicks_every: int | None = None) -> EvalResult:
    """``members_explicit`` or ``members_implicit`` by ``mode`` (``sync_sessions``,
    ``clicks_every``: see :func:`members_implicit`)."""
    if mode == "explicit":
        return members_explicit(data, config, members, sync_every)
    return members_implicit(data, config, members, sync_every, sync_sessions=sync_sessions, clicks_every=clicks_every)
