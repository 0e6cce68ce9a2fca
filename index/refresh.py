"""Periodic index rebuilds in the background, swapped in atomically."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex
from recstream.embeddings.drift import mean_cosine_drift
from recstream.embeddings.model import OnlineMF
from recstream.index.build import BuildCancelled, build_in_subprocess, mips_item_vectors

log = logging.getLogger(__name__)

# Item drift is measured on items with at least this many events: younger ones are still
# leaving their random start, and their moves are learning, not drift.
SETTLED_EVENTS = 50


@dataclass(frozen=True)
class IndexConfig:
    """The ``[index]`` config section."""

    n_trees: int = 50
    search_k: int = -1
    # Rebuild when the index is this old and anything changed ...
    rebuild_interval_s: float = 60.0
    # ... or sooner, once this share of the items changed (they are scored exactly until then),
    # but not more often than min_rebuild_interval_s.
    rebuild_changed_fraction: float = 0.1
    min_rebuild_interval_s: float = 10.0
    # A build that took t seconds is followed by the next no sooner than t / max_build_share
    # seconds later: a big catalogue is rebuilt less often rather than all the time.
    max_build_share: float = 0.25
    min_items: int = 1
    build_timeout_s: float = 600.0
    # At most this many items (the recently popular, then the highest potential) are scored
    # exactly for every update; the index serves the rest, to at most max_lookups users per
    # publishing call (see index/query.py), those whose tail could beat their list by the widest
    # margin. A lookup costs a tree walk (about half a millisecond at a million items), so this cap
    # is what bounds a live round's time; users past it get the hot set's list.
    exact_items: int = 8192
    max_lookups: int = 100
    # Frequency filter: an item is indexed and recommended only once it has this many events (it
    # is learned from the first): ids seen once or twice (typos, bots, a flood of new ids) stay
    # out of the index and out of everyone's top-K. 1: every item.
    min_item_events: int = 1


@dataclass(frozen=True)
class BuiltIndex:
    """An Annoy index and the model state it was built from (immutable once made)."""

    annoy: AnnoyIndex
    version: int
    model_version: int  # item rows changed after this are not reflected in ``annoy``
    n_items: int  # items indexed (with index.min_item_events, not all rows below annoy's item count)
    built_at: float
    build_seconds: float
    path: Path

    def nearest(self, query: list[float], n: int, search_k: int) -> list[int]:
        return self.annoy.get_nns_by_vector(query, n, search_k=search_k)


class IndexRefresher:
    """Keeps ``current`` an index of the item vectors no older than the triggers allow.

    A thread waits for a trigger (``rebuild_interval_s`` passed, or more than
    ``rebuild_changed_fraction`` of the items changed since the last build),
    copies the item vectors under ``model_lock``, builds in a child process
    and rebinds ``current``. Readers take ``current`` once per query round; a
    rebind never invalidates an index a reader holds (its memory map lives as
    long as the object), so queries never see a half-built index.
    """

    def __init__(self, model: OnlineMF, model_lock: threading.Lock, directory: Path, config: IndexConfig,
                 first_version: int = 1) -> None:
        self.model = model
        self.model_lock = model_lock
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.current: BuiltIndex | None = None
        # Versions only grow, across restarts too: past the checkpoint's and any file left behind.
        leftovers = list(self.directory.glob("items-v*"))
        built = [int(p.name[len("items-v"):].split(".")[0]) for p in leftovers
                 if p.name[len("items-v"):].split(".")[0].isdigit()]
        self.next_version = max([first_version, *(v + 1 for v in built)])
        for path in leftovers:  # an earlier run's indexes: nobody maps them any more
            path.unlink(missing_ok=True)
        self.builds = 0
        self.failures = 0
        self.item_drift = 0.0  # mean cosine distance of item vectors between the last two builds
        self.item_drift_items = 0  # how many items that distance was measured on
        self._previous_vectors: np.ndarray | None = None
        self._previous_version = 0  # model version of the previous build
        self._previous_settled = np.zeros(0, dtype=bool)  # items with SETTLED_EVENTS events at that build
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False  # no build starts while set (the consumer is behind: see RecStreamService)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-refresher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def poke(self) -> None:
        """Ask for a trigger check now (the consumer calls this after a batch)."""
        self._wake.set()

    def due(self) -> bool:
        n_items = len(self.model.items)
        if n_items < self.config.min_items or self.held:
            return False
        current = self.current
        if current is None:
            if self.config.min_item_events > 1:  # (items' counts only grow: checked until the first build)
                with self.model_lock:
                    return len(self._indexable()) >= self.config.min_items
            return True
        age = time.monotonic() - current.built_at
        if age < current.build_seconds / self.config.max_build_share - current.build_seconds:
            return False
        if age >= self.config.rebuild_interval_s:
            return current.model_version < self.model.model_version
        if age < self.config.min_rebuild_interval_s:
            return False
        with self.model_lock:  # the consumer may be growing the arrays this reads
            changed = len(self.model.items_changed_since(current.model_version))
        return changed > self.config.rebuild_changed_fraction * n_items

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.due():
                    self.rebuild()
            except BuildCancelled:
                log.info("index build cancelled: stopping")
                return
            except Exception:  # a failed build must not kill the refresher: the old index stays
                self.failures += 1
                log.exception("index rebuild failed; keeping index version %s",
                              self.current.version if self.current else None)
                self._stop.wait(5.0)

    def _indexable(self) -> np.ndarray:
        """Rows of the items with ``min_item_events`` events or more (1: every item, those with a
        content placeholder and no event too), free rows (of forgotten items) left out (call with
        the model lock)."""
        n_items = len(self.model.items)
        if self.config.min_item_events > 1:
            indexable = self.model.interaction_counts(np.arange(n_items)) >= self.config.min_item_events
        else:
            indexable = np.ones(n_items, dtype=bool)
        indexable[self.model.items.ids.free] = False
        return np.flatnonzero(indexable)

    def rebuild(self) -> BuiltIndex:
        """Build an index of the current item vectors and swap it in (blocking)."""
        started = time.monotonic()
        with self.model_lock:
            model_version = self.model.model_version
            vectors = self.model.items.vectors.copy()
            biases = self.model.ranking_biases()
            settled = np.flatnonzero(self.model.interaction_counts(np.arange(len(vectors))) >= SETTLED_EVENTS)
            every = self.config.min_item_events <= 1 and not len(self.model.items.ids.free)
            rows = None if every else self._indexable()
            # Items forgotten since the last build: their rows' vectors are not the same item's.
            reset = (self.model.items_forgotten_after(self._previous_version)
                     if self._previous_vectors is not None else None)
        if self._previous_vectors is not None:
            # Only items settled at the previous build too: one that got its first 50 events since
            # then has left its random start, which is learning, not drift.
            both = settled[settled < len(self._previous_settled)]
            both = both[self._previous_settled[both] & ~reset[both]]
            self.item_drift = mean_cosine_drift(self._previous_vectors, vectors, both)
            self.item_drift_items = len(both)
        self._previous_vectors = vectors
        self._previous_version = model_version
        self._previous_settled = np.zeros(len(vectors), dtype=bool)
        self._previous_settled[settled] = True
        points = mips_item_vectors(vectors, biases) if rows is None else mips_item_vectors(vectors[rows], biases[rows])
        version = self.next_version
        self.next_version += 1
        path = self.directory / f"items-v{version}.ann"
        build_in_subprocess(points, path, self.config.n_trees, self.config.build_timeout_s, cancel=self._stop,
                            rows=rows)
        annoy = AnnoyIndex(points.shape[1], "angular")
        annoy.load(str(path))  # memory-maps: no copy, ~0 ms
        built = BuiltIndex(annoy, version, model_version, len(points), time.monotonic(), time.monotonic() - started, path)
        previous, self.current = self.current, built
        self.builds += 1
        if previous is not None:
            # Unlinking a mapped file is safe on POSIX: readers holding ``previous`` keep their map.
            previous.path.unlink(missing_ok=True)
        log.info("index v%d: %d items, built in %.2fs, item drift since the last build %.3f",
                 version, len(points), built.build_seconds, self.item_drift)
        return built
