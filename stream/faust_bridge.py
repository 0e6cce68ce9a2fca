"""recstream inside a Faust app: feed a stream's events to a learner, answer from a web view.

For teams that already run Faust (``pip install 'recstream[faust]'``; see
examples/faust_app.py). The learner is the service's model, decoder, index
refresher and recommender without the service's Kafka loop: Faust owns
consumption, offsets and rebalancing. What that does not give, compared with
``recstream run``: no checkpoints or effectively-once state (Faust commits
offsets as it processes; a restart starts the model from scratch, or from a
``recstream replay`` checkpoint given as ``state_dir``, which this learner does
not write), no dead-letter topic (bad events are counted and logged), no output
topic of updates, and Faust's per-message asyncio path in front of the batch
update (measured in docs/operations.md).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from recstream.index.query import Recommender
from recstream.index.refresh import IndexRefresher
from recstream.stream.checkpoint import CheckpointStore
from recstream.stream.config import ServiceConfig, load_config
from recstream.stream.events import EventDecoder
from recstream.stream.metrics import reason_label
from recstream.stream.state import RecState
from recstream.stream.web import recommendation_message

log = logging.getLogger(__name__)


class FaustLearner:
    """A recstream model fed with batches of event values (JSON bytes or dicts), queried by user id.

    ``learn`` blocks for one batch update (milliseconds for a thousand events):
    call it from an agent with ``stream.take(n, within=s)`` so it runs once per
    batch, not once per event.
    """

    def __init__(self, config: ServiceConfig | None = None, state_dir: str | Path | None = None) -> None:
        self.config = config or load_config()
        out = self.config.output
        store = CheckpointStore(Path(state_dir) / "checkpoints") if state_dir else None
        self.state = RecState.load_or_new(store, self.config.model, out.history_per_user)
        self.model = self.state.model
        self.model_lock = threading.Lock()
        self.decoder = EventDecoder(self.config.events)
        self.recommender = Recommender(self.model, self.state.history if out.exclude_seen else None,
                                       out.top_k, self.config.index.search_k,
                                       min_item_events=self.config.index.min_item_events)
        self._index_dir = tempfile.TemporaryDirectory(prefix="recstream-faust-index-")
        self.refresher = IndexRefresher(self.model, self.model_lock, Path(self._index_dir.name), self.config.index)
        self.refresher.start()
        self.events_applied = 0
        self.rejected: dict[str, int] = {}
        self.last_event_ts = 0

    def learn(self, values: Sequence[bytes | dict | None]) -> int:
        """Apply the valid events of one batch in order; returns how many were applied."""
        batch, bad = self.decoder.decode(values)
        for position, reason in bad:
            label = reason_label(reason)
            self.rejected[label] = self.rejected.get(label, 0) + 1
            if sum(self.rejected.values()) <= 5:
                log.warning("skipping a bad event: %s", reason)
        if not len(batch):
            return 0
        stamps = batch.timestamps
        stamps[stamps < 0] = int(time.time() * 1000)  # no ts in the event: now (Faust has the record time too)
        with self.model_lock:
            self.state.apply(batch)
        self.events_applied += len(batch)
        self.last_event_ts = max(self.last_event_ts, int(stamps.max()))
        self.refresher.poke()
        return len(batch)

    def recommend(self, user_id: str, k: int | None = None) -> dict | None:
        """The user's top k (default ``output.top_k``) as an output message; None for a user never seen."""
        k = self.recommender.k if k is None else int(np.clip(k, 1, self.recommender.k))
        return recommendation_message(self.recommender, self.model_lock, self.refresher.current, user_id, k,
                                      self.last_event_ts)

    def close(self) -> None:
        self.refresher.stop()
        self._index_dir.cleanup()
