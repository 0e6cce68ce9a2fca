"""The service's learned state and where in the input it stands: applied, saved and restored as one.

Live consumption (``RecStreamService``) and replay (``recstream replay``)
both apply events through :meth:`RecState.apply`, so a log replayed from a
file and the same events consumed from Kafka give the same state.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
from recstream.embeddings.content import ContentPlaceholders, ContentProjector, ItemContent, metadata_features
from recstream.embeddings.expiry import Expiry, part
from recstream.embeddings.history import InteractionHistory
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.embeddings.session import SessionSignals
from recstream.embeddings.sync import ItemSync
from recstream.embeddings.text import HashedWords, MiniLMText, make_text_encoder
from recstream.stream.checkpoint import FORMAT_VERSION, Checkpoint, CheckpointStore, IncompatibleCheckpoint
from recstream.stream.events import EventBatch
from recstream.stream.publishing import PendingUpdates

log = logging.getLogger(__name__)

# Changing any of these makes stored vectors meaningless or unloadable.
_MUST_MATCH = ("dim",)


class RecState:
    """Model, interaction history, users awaiting an update, and per input partition: next offset
    and events applied.

    Partitions are keyed ``"topic/partition"`` so the checkpoint metadata stays plain JSON.
    """

    def __init__(self, config: MFConfig, history_per_user: int = 500) -> None:
        self.model = OnlineMF(config)
        self.history = InteractionHistory(history_per_user)
        self.sessions = SessionSignals(config)
        self.content = ItemContent()
        self.projector = ContentProjector()
        self.placeholders = ContentPlaceholders()
        # Users whose update is still to be published: a checkpoint may commit offsets past their
        # events only because it carries them (see stream.publishing).
        self.pending = PendingUpdates()
        self.text_encoder: HashedWords | MiniLMText = HashedWords()  # how item text becomes features
        self.positions: dict[str, int] = {}  # next offset to read
        self.applied: dict[str, int] = {}  # valid events applied to the model
        self.index_version = 0
        self.topic_ids: dict[str, str] = {}  # input topic -> the broker's id for it (a recreated topic has a new one)
        self.expiry = Expiry(config.max_users, config.user_ttl_s)
        self.item_expiry = Expiry(config.max_items, config.item_ttl_s)
        # Rows of users the last apply forgot that no new user took (anything keyed by row, such as
        # the updates pending for publication, must drop them).
        self.forgotten = np.zeros(0, dtype=np.int64)
        self.users_forgotten = 0  # all time (since start-up)
        self.items_forgotten = 0
        # Whatever forgets items (the item expiry here, or anyone calling OnlineMF.forget_items),
        # what is kept per item beside the model goes with them.
        self.model.item_forget_hooks.append(self._drop_items)
        if self.item_expiry.enabled:  # load the history's compiled pass now, not in the first eviction's batch
            self.history.forget_items(np.zeros(0, dtype=np.int64))
        # Item state shared with the group (stream.group_sync), once enable_item_sync is called;
        # where this member stands in the sync topic ("topic/partition" -> next offset).
        self.item_sync: ItemSync | None = None
        self.sync_positions: dict[str, int] = {}
        self._stored_sync: tuple[dict[str, np.ndarray], dict] | None = None  # from the checkpoint

    def apply(self, batch: EventBatch, topic: str | None = None, partition_of_event: np.ndarray | None = None,
              rate_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Learn from ``batch`` in order; ``partition_of_event`` (of ``topic``) feeds the per-partition counts.

        Returns the user and item rows of the events and each event's prequential loss
        (squared error of a rating; logistic loss of an implicit positive). With bounded memory
        (``model.max_users``, ``user_ttl_s``, ``max_items``, ``item_ttl_s``) the batch is learned in
        runs, users and items forgotten between them where the event sequence says so (see
        embeddings/expiry.py): a row in the result belongs to the user or item that had it at that event.
        """
        timestamps = np.maximum(batch.timestamps, 0)
        predictions = np.empty(len(batch), dtype=np.float64)
        if partition_of_event is not None:
            partition_of_event = np.asarray(partition_of_event)
        if not (self.expiry.enabled or self.item_expiry.enabled):
            users, items = self._apply_run(batch, timestamps, predictions, rate_scale, 0, len(batch),
                                           partition_of_event)
        else:
            model = self.model
            forgotten, runs = [], []
            start = 0
            while start < len(batch):
                forget = self.expiry.to_forget(model.users.ids, *model.activity(), batch.user_ids, timestamps, start)
                if len(forget):
                    self.forget_users(forget)
                    forgotten.append(forget)
                model.forget_items(self.item_expiry.to_forget(model.items.ids, *model.item_activity(), batch.item_ids,
                                                              timestamps, start))
                end = min(self.expiry.run_end(model.users.ids, batch.user_ids, timestamps, start),
                          self.item_expiry.run_end(model.items.ids, batch.item_ids, timestamps, start))
                runs.append(self._apply_run(batch, timestamps, predictions, rate_scale, start, end,
                                            partition_of_event))
                start = end
            users, items = (np.concatenate(rows) for rows in zip(*runs)) if runs else (np.zeros(0, np.int64),) * 2
            self.forgotten = (np.intersect1d(np.concatenate(forgotten), self.model.users.ids.free) if forgotten
                              else np.zeros(0, dtype=np.int64))
        if partition_of_event is not None:
            counts = np.bincount(partition_of_event)
            for partition in np.flatnonzero(counts).tolist():
                key = f"{topic}/{partition}"
                self.applied[key] = self.applied.get(key, 0) + int(counts[partition])
        explicit = ~np.isnan(batch.ratings)
        losses = np.where(explicit, (batch.ratings - predictions) ** 2, np.logaddexp(0.0, -predictions))
        return users, items, losses

    def _apply_run(self, batch: EventBatch, timestamps: np.ndarray, predictions: np.ndarray, rate_scale: float,
                   start: int, end: int, partition_of_event: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Learn events ``start:end`` of ``batch``; returns their user and item rows."""
        users = self.model.users.rows(part(batch.user_ids, start, end))
        items = self.model.items.rows(part(batch.item_ids, start, end))
        ts = timestamps[start:end]
        seq_before = self.model.events_applied
        with self._learning_sessions(users, items, ts, None if batch.session_keys is None
                                     else batch.session_keys[start:end]):
            self._learn_model(users, items, batch.ratings[start:end], batch.weights[start:end],
                              predictions[start:end], ts, rate_scale)
            self.history.add(users, items)
            # Kept also while nothing expires: turning expiry on later finds every user's and item's activity.
            seq = np.arange(seq_before + 1, seq_before + 1 + len(users), dtype=np.int64)
            for rows, (last_active, last_seq) in ((users, self.model.activity()), (items, self.model.item_activity())):
                np.maximum.at(last_active, rows, ts)
                np.maximum.at(last_seq, rows, seq)
            self.expiry.advance(ts)
            self.item_expiry.advance(ts)
            if partition_of_event is not None:  # (a user's later event wins: numpy assigns in order)
                self.model.input_partitions()[users] = partition_of_event[start:end]
        return users, items

    def forget_users(self, rows: np.ndarray) -> None:
        """Forget the users of ``rows`` everywhere: their ids, learned values, history and session.
        A forgotten user's row then holds exactly what a new user's row holds, for the next new id."""
        self.model.forget_users(rows)
        self.history.forget(rows)
        self.sessions.forget(rows)
        self.users_forgotten += len(rows)

    def _drop_items(self, rows: np.ndarray) -> None:
        """Forgotten items (an ``OnlineMF.forget_items`` hook) leave histories (the recommender's
        exclusions), sessions and content."""
        self.history.forget_items(rows)
        self.sessions.forget_items(rows)
        self.content.forget(rows)
        self.placeholders.forget(rows)
        self.items_forgotten += len(rows)

    def users_of_partition(self, partition: int) -> np.ndarray:
        """Rows of the held users whose latest event came from input ``partition``."""
        n = len(self.model.users)
        live = np.ones(n, dtype=bool)
        live[self.model.users.ids.free] = False
        return np.flatnonzero((self.model.input_partitions()[:n] == partition) & live)

    def enable_item_sync(self, member: str, sessions: bool = True) -> ItemSync:
        """Share item state with the group as ``member`` (and the session signals' clicks, with
        ``sessions``), continuing from the checkpoint's sync state if it has one (else every
        item's learning so far is this member's first delta)."""
        self.item_sync = ItemSync(self.model, member, self.sessions if sessions else None)
        if self._stored_sync is not None:
            arrays, meta = self._stored_sync
            if meta.get("member") == member:
                self.item_sync.load(arrays, meta)
                self.sync_positions = {k: int(v) for k, v in meta.get("positions", {}).items()}
            else:
                log.warning("the checkpoint's item sync was member %r's; as %r this member sends everything "
                            "again and reads the sync topic from its start", meta.get("member"), member)
        return self.item_sync

    def use_text_encoder(self, name: str) -> None:
        """``content.text_encoder`` (not stored in checkpoints: the features it made are)."""
        self.text_encoder = make_text_encoder(name)

    def learn_rows(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, weights: np.ndarray,
                   predictions: np.ndarray | None = None, timestamps: np.ndarray | None = None,
                   rate_scale: float = 1.0, session_keys: np.ndarray | None = None) -> None:
        """Learn events given by rows (see ``OnlineMF.learn_rows``) and into the session signals
        (``session_keys``: int64 per event, 0 = no session id); items holding a content placeholder
        get their own initial vector back first."""
        with self._learning_sessions(users, items, timestamps, session_keys):
            self._learn_model(users, items, ratings, weights, predictions, timestamps, rate_scale)

    def _learning_sessions(self, users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None,
                           session_keys: np.ndarray | None) -> AbstractContextManager:
        """The session signals learn these events on the other core while the block runs (see
        ``SessionSignals.learning``); the block must not touch them."""
        if not self.sessions.enabled:
            return nullcontext()
        return self.sessions.learning(users, items, np.zeros(len(users), np.int64) if timestamps is None
                                      else timestamps, session_keys)

    def _learn_model(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, weights: np.ndarray,
                     predictions: np.ndarray | None, timestamps: np.ndarray | None, rate_scale: float) -> None:
        self.placeholders.release(self.model, items)
        self.model.learn_rows(users, items, ratings, weights, predictions, timestamps, rate_scale)

    def encode_item_metadata(self, features: list[dict | None], texts: list[str | None]
                             ) -> tuple[list[list[str]], np.ndarray | None]:
        """Items' feature names and text vectors (or None). Reads no learned state, so the service
        runs it outside the model lock: MiniLM takes a few milliseconds per text on a CPU."""
        vectors = self.text_encoder.vectors(texts)
        return [metadata_features(f) + self.text_encoder.features(t) for f, t in zip(features, texts)], vectors

    def set_item_metadata(self, item_ids: list[str], features: list[dict | None], texts: list[str | None],
                          encoded: tuple[list[list[str]], np.ndarray | None] | None = None) -> int:
        """Record items' content features (items are created if new); ``encoded``: the
        :meth:`encode_item_metadata` of ``features`` and ``texts``, if already made.

        Once the content regression has been fitted, items without events get their
        placeholder at once, not at the next refresh; returns how many did.
        """
        names, vectors = encoded if encoded is not None else self.encode_item_metadata(features, texts)
        rows = self.model.items.rows(item_ids)
        for n, row in enumerate(rows.tolist()):
            self.content.set(row, names[n], None if vectors is None else vectors[n])
        placed = self.placeholders.place(self.model, self.content, self.projector, rows)
        self.items_arrived(rows)  # (last: what was just set for an item over the cap goes with it)
        return placed

    def items_arrived(self, rows: np.ndarray) -> None:
        """Items that came outside the event sequence (their metadata, a handed-over user's
        history): those never active here (new ones) count as active from now, or the item expiry
        would take them first, and the cap (``model.max_items``) holds, the least recently active
        others going first, so such input alone cannot grow the table past it either."""
        _, last_seq = self.model.item_activity()
        rows = np.asarray(rows, dtype=np.int64)
        fresh = rows[last_seq[rows] == 0]  # (an item with an event here has a place in the input, from 1)
        self.model.touch_items(fresh, self.item_expiry.clock)
        self.model.forget_items(self.item_expiry.over_cap(self.model.items.ids, last_seq, fresh))

    def refresh_cold_items(self, min_count: int = 5) -> int:
        """Refit the content regression on items with ``min_count`` events or more and give the
        items with none a content placeholder (see embeddings.content); returns how many got one."""
        if not len(self.content):
            return 0
        return self.placeholders.refresh(self.model, self.content, self.projector, min_count)

    def advance(self, positions: dict[str, int]) -> None:
        self.positions.update(positions)

    # -- checkpoints ---------------------------------------------------------------------------

    def snapshot(self, copy: bool = True) -> tuple[dict[str, np.ndarray], dict]:
        """The state as arrays and metadata: a consistent copy, safe to write from another thread;
        ``copy=False`` leaves the model's arrays as views (for a forked writer, which has its own)."""
        arrays = {f"model.{k}": np.array(v, copy=True) if copy else v for k, v in self.model.state_arrays().items()}
        arrays.update({f"history.{k}": v for k, v in self.history.to_arrays().items()})
        arrays.update({f"expiry.{k}": v for k, v in self.expiry.to_arrays().items()})
        arrays.update({f"item_expiry.{k}": v for k, v in self.item_expiry.to_arrays().items()})
        arrays.update({f"sessions.{k}": v for k, v in
                       self.sessions.to_arrays(len(self.model.users), len(self.model.items)).items()})
        arrays.update({f"content.{k}": v for k, v in self.content.to_arrays().items()})
        arrays.update({f"content.{k}": v for k, v in self.placeholders.to_arrays().items()})
        # The fitted regression too: metadata arriving after a restart gets its placeholder at once.
        arrays.update({f"projector.{k}": np.array(v, copy=True) for k, v in self.projector.to_arrays().items()})
        arrays.update({f"pending.{k}": v for k, v in self.pending.to_arrays().items()})
        if self.item_sync is not None:
            arrays.update({f"sync.{k}": v for k, v in self.item_sync.to_arrays().items()})
        meta = {
            "model_config": asdict(self.model.config),
            "positions": dict(self.positions),
            "applied": dict(self.applied),
            "index_version": self.index_version,
            "topic_ids": dict(self.topic_ids),
            "events_applied": self.model.events_applied,
            "pending_users": len(self.pending),
        }
        if self.item_sync is not None:
            meta["sync"] = {**self.item_sync.to_meta(), "positions": dict(self.sync_positions)}
        return arrays, meta

    def save(self, store: CheckpointStore) -> Path:
        return store.save(*self.snapshot())

    @classmethod
    def restore(cls, checkpoint: Checkpoint, config: MFConfig, history_per_user: int = 500) -> RecState:
        written = checkpoint.meta.get("format")
        if not isinstance(written, int) or written > FORMAT_VERSION:
            # A newer layout read as this one could load arrays that mean something else: stop instead.
            raise IncompatibleCheckpoint(
                f"checkpoint {checkpoint.path} has format {written!r}; this recstream reads format "
                f"{FORMAT_VERSION} and older (run the recstream that wrote it, or use a new state dir)")
        stored = checkpoint.meta.get("model_config", {})
        differ = [f"model.{k}: config has {getattr(config, k)!r}, checkpoint has {stored.get(k)!r}"
                  for k in _MUST_MATCH if stored.get(k) != getattr(config, k)]
        if differ:
            raise IncompatibleCheckpoint(
                f"checkpoint {checkpoint.path} was made with another configuration: " + "; ".join(differ)
                + " (use another state dir, or the checkpoint's settings)")
        for key, value in stored.items():
            if key not in _MUST_MATCH and getattr(config, key, value) != value:
                log.warning("model.%s changed from %r (checkpoint) to %r", key, value, getattr(config, key))
        state = cls(config, history_per_user)
        arrays = checkpoint.arrays
        try:
            state.model.load_state_arrays({k[6:]: v for k, v in arrays.items() if k.startswith("model.")})
        except KeyError as exc:
            raise IncompatibleCheckpoint(f"checkpoint {checkpoint.path} lacks {exc.args[0]!r}: it was written by an "
                                         "older version of recstream (use a new state dir)") from exc
        state.history.load_arrays({k[8:]: v for k, v in arrays.items() if k.startswith("history.")})
        state.sessions.load_arrays({k[9:]: v for k, v in arrays.items() if k.startswith("sessions.")})
        state._load_expiry(arrays)
        if "content.items" in arrays:
            content = {k[8:]: v for k, v in arrays.items() if k.startswith("content.")}
            state.content.load_arrays(content)
            state.placeholders.load_arrays(content)
        state.projector.load_arrays({k[10:]: v for k, v in arrays.items() if k.startswith("projector.")})
        state.pending.load_arrays({k[8:]: v for k, v in arrays.items() if k.startswith("pending.")})
        state.positions = {k: int(v) for k, v in checkpoint.meta.get("positions", {}).items()}
        state.applied = {k: int(v) for k, v in checkpoint.meta.get("applied", {}).items()}
        state.index_version = int(checkpoint.meta.get("index_version", 0))
        state.topic_ids = dict(checkpoint.meta.get("topic_ids", {}))
        if "sync" in checkpoint.meta:
            state._stored_sync = ({k[5:]: v for k, v in arrays.items() if k.startswith("sync.")},
                                  checkpoint.meta["sync"])
        return state

    def _load_expiry(self, arrays: dict[str, np.ndarray]) -> None:
        """The expiry clocks and users' and items' activity, or for a checkpoint from before bounded
        memory for them (which has neither) the newest event time it holds, with every user (item)
        active then: none expires before a full TTL after the restart's events."""
        n = len(self.model.users)
        clock = max(self.model.latest_event_ms(), int(self.sessions.last_ts[:n].max(initial=0)))
        for name, expiry, (last_active, _), rows, stored in (
                ("expiry", self.expiry, self.model.activity(), n, "model.last_active"),
                ("item_expiry", self.item_expiry, self.model.item_activity(), len(self.model.items),
                 "model.item_last_active")):
            if f"{name}.state" in arrays:
                expiry.load_arrays({k[len(name) + 1:]: v for k, v in arrays.items() if k.startswith(f"{name}.")})
                continue
            expiry.clock = clock
            if stored not in arrays:
                last_active[:rows] = clock

    @classmethod
    def load_or_new(cls, store: CheckpointStore | None, config: MFConfig, history_per_user: int = 500) -> RecState:
        checkpoint = store.load_latest() if store is not None else None
        if checkpoint is None:
            return cls(config, history_per_user)
        state = cls.restore(checkpoint, config, history_per_user)
        log.info("restored %s: %d users, %d items, %d events, positions %s", checkpoint.path.name,
                 len(state.model.users), len(state.model.items), state.model.events_applied, state.positions)
        return state
