"""Session signals: what the clicks of the current session say about the next one, learned online.

A session is a user's run of events with the same ``session_id`` or, for
events without one, with gaps under ``session_gap_s``. For the current
session ``s_1 .. s_m`` (oldest first, its last ``session_length`` clicks)
an item ``x`` gets four signals, each divided by its largest value over the
items it reaches, so each lies in [0, 1]:

- sequential rules: ``sum_{i <= w} R(s_{m-i+1} -> x) / (i max_z R(s_{m-i+1} -> z))``
  over the last ``w = session_query_window`` clicks, where ``R(y -> x)`` gains
  ``1 / gap`` each time ``x`` follows ``y`` within ``session_rules_window``
  clicks (session-rec's SR; embeddings.item_neighbours);
- co-occurrence: ``sum_i (i / m) C(s_i, x) / max_z C(s_i, z)``, where ``C`` counts
  pairs within the same window, both ways;
- neighbourhood: V-SKNN over the ring of recent sessions (embeddings.session_knn);
- repeat: ``sum_{j: s_{m-j+1} = x} 1 / j``, recency and frequency of ``x`` in the
  session itself, weighted by the odds ``r / (1 - r)`` that a next click is a re-view, ``r``
  measured online (37% of next clicks on YOOCHOOSE; a log where sessions rarely re-view
  their items gets little of it).

The session score is the blend ``sum_k w_k f_k(x)``; the full ranking score
adds ``w_mf`` times the factor model's score (``b_i + u . q_i``), which orders
the items the session signals do not reach. Weights are ``model.session_*_weight``.

>>> from recstream.embeddings.session import SessionSignals  # numba caches by file: compile it
... # under the installed name, as the service does
>>> import numpy as np
>>> from recstream.embeddings.model import MFConfig
>>> signals = SessionSignals(MFConfig(session_half_life_s=0, session_repeat_weight=0))  # plain counts, no re-views
>>> users, items = np.zeros(4, np.int64), np.array([0, 1, 0, 1])  # one session: 0 1 0 1
>>> signals.update(users, items, np.arange(4, dtype=np.int64) * 1000)
>>> rows, weights = signals.rules.neighbours(0)
>>> sorted(zip(rows.tolist(), weights.tolist()))  # 0 -> 1 twice at gap 1 (gap 3 is past the window of 2); 0 -> 0 at gap 2
[(0, 0.5), (1, 2.0)]
>>> rows, scores = signals.candidates(np.array([0]), 3000)[0]
>>> int(rows[np.argmax(scores)])  # after ... 0 1, item 0 comes next
0
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numba
import numpy as np
from recstream.embeddings.item_neighbours import ItemNeighbours
from recstream.embeddings.session_kernels import N_SIGNALS, candidates_batch, drop_listed, drop_neighbours, learn_batch
from recstream.embeddings.session_knn import RecentSessions, drop_items

# Fewer users than this per thread are scored in the calling thread alone.
_USERS_PER_THREAD = 256
# Room for this many reached items per user to begin with (the buffers double when a user needs more).
_ROWS_PER_USER = 64
# Batches of fewer events than this are learned in the calling thread (handing them to the
# worker would cost more than the overlap gains).
_BACKGROUND_MIN_EVENTS = 256
_USER_STATE = (("hist", np.int32), ("hlen", np.int64), ("last_ts", np.int64), ("skey", np.int64),
               ("serial", np.int64))
# Rows for the current sessions of the group's other members (see learn_remote). A session's key
# picks its row; two sessions on one row at once restart each other in turn, so the table is
# sized far past the sessions a group has going at once.
_REMOTE_SESSIONS = 65_536
_NO_SERIALS = np.zeros(0, dtype=np.int64)


class SessionSignals:
    """Per-user current sessions plus the item-to-item and session-neighbourhood signals they feed.

    ``update`` learns a batch of events in order (after they were scored);
    ``candidates`` gives, per user, the items the session signals reach and
    their blended score (see the module docstring). The same events in the
    same order give the same arrays, however they are batched.
    """

    def __init__(self, config) -> None:
        c = config
        self.config = config
        self.gap_ms = float(c.session_gap_s) * 1000.0
        self.length = c.session_length
        self.rules = ItemNeighbours(c.session_neighbours, c.session_half_life_s)
        self.cooc = ItemNeighbours(c.session_neighbours, c.session_half_life_s)
        self.ring = RecentSessions(c.session_ring, c.session_length, c.session_per_item, c.session_knn_sample,
                                   c.session_knn_k)
        self.weights = np.array([c.session_rules_weight, c.session_cooc_weight, c.session_knn_weight,
                                 c.session_repeat_weight], dtype=np.float64)
        self.hist = np.zeros((1024, self.length), dtype=np.int32)
        self.hlen = np.zeros(1024, dtype=np.int64)
        self.last_ts = np.zeros(1024, dtype=np.int64)
        self.skey = np.zeros(1024, dtype=np.int64)
        self.serial = np.zeros(1024, dtype=np.int64)
        self.next_serial = np.zeros(1, dtype=np.int64)
        self.repeats = np.array([1.0, 2.0])  # (decayed) re-view clicks, continuing clicks
        self._items = 0
        self._worker: ThreadPoolExecutor | None = None  # for ``learning``, made at its first big batch
        # Sharing with a consumer group (``share``): the clicks learned and not yet taken (session
        # serials, item rows, times), the count the group already has from before a restart, and
        # the other members' current sessions.
        self.sharing = False
        self._unsent: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._sent_ahead = 0
        self._remote: dict[str, np.ndarray] | None = None
        self._remote_waiting: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (see learn_remote)
        self._fit_scratch(1024)
        # Load the compiled kernels now (from numba's disk cache: about a second, once per process),
        # not in the first batch a consumer handles.
        empty = np.zeros(0, dtype=np.int64)
        learn_batch(empty, empty, empty, empty, self.learn_args(), empty)
        candidates_batch(empty, empty, empty, self.score_args(), empty, np.zeros(0), empty)
        if c.max_items or c.item_ttl_s:  # items will be forgotten (see forget_items)
            none = np.zeros(0, dtype=bool)
            drop_neighbours(self.rules.rows[:0], self.rules.weights[:0], self.rules.errors[:0], none)
            drop_listed(self.hist[:0], self.hlen[:0], empty, none)

    @property
    def enabled(self) -> bool:
        return bool(self.weights.any())

    def _fit_scratch(self, items: int) -> None:
        (self.acc, self.touched, self.tmark, self.n_touched, self.session_buf, self.knn_scratch,
         self.calls) = self._new_scratch(items, self.ring.scratch(items, self.length))
        self._thread_scratch: list[tuple] = []  # one more set per further thread of ``candidates_csr``

    def _new_scratch(self, items: int, knn_scratch: tuple) -> tuple:
        """The work arrays of one ``candidates_batch`` call (marked, never cleared between users)."""
        return (np.zeros((N_SIGNALS + 1, items), dtype=np.float64), np.zeros(items, dtype=np.int64),
                np.zeros(items, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(self.length, dtype=np.int64),
                knn_scratch, np.zeros(1, dtype=np.int64))

    def fit(self, users: int, items: int) -> None:
        """Room for user rows below ``users`` and item rows below ``items``."""
        if users > len(self.hlen):
            size = max(users, 2 * len(self.hlen))
            for name, dtype in _USER_STATE:
                old = getattr(self, name)
                new = np.zeros((size, *old.shape[1:]), dtype=dtype)
                new[: len(old)] = old
                setattr(self, name, new)
        if items > self._items:
            self._items = items
            self.rules.fit(items)
            self.cooc.fit(items)
            self.ring.fit(items)
            if items > len(self.tmark):
                self._fit_scratch(max(items, 2 * len(self.tmark)))

    def forget(self, user_rows: np.ndarray) -> None:
        """Drop the current sessions of ``user_rows`` (forgotten users): a new user of the row
        starts a session of its own. The ring keeps their past sessions, as it keeps everyone's."""
        rows = np.asarray(user_rows, dtype=np.int64)
        if len(rows) == 0:
            return
        self.fit(int(rows.max()) + 1, 0)
        for name, _ in _USER_STATE:
            getattr(self, name)[rows] = 0

    def forget_items(self, item_rows: np.ndarray) -> None:
        """Drop ``item_rows`` (forgotten items) from everything the signals hold: their rule and
        co-occurrence rows and their place among other items' neighbours, the sessions of the
        ring and its item -> session index, and users' current sessions (which keep their other
        clicks, in order). A new item of the row starts with no signal."""
        items = np.asarray(item_rows, dtype=np.int64)
        if len(items) == 0:
            return
        self.learn_waiting()  # (their rows are these items' until now)
        self.rules.forget(items)
        self.cooc.forget(items)
        self.ring.forget_items(items)
        for sessions in (self._user_state(), *([self._remote] if self._remote is not None else [])):
            hist, hlen = sessions["hist"], sessions["hlen"]
            m = np.minimum(hlen, self.length)
            drop_items(hist, hlen, items, start=(hlen - m) % self.length)
        if self._unsent:  # a later item of the row is another item: its clicks are not these
            serials, rows, ts = self._unsent_arrays()
            keep = ~np.isin(rows, items)
            self._unsent = [(serials[keep], rows[keep], ts[keep])]

    def _user_state(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name, _ in _USER_STATE}

    def learn_args(self, sessions: dict[str, np.ndarray] | None = None) -> tuple:
        """The arrays the learning kernel takes after the events (see ``learn_event``);
        ``sessions``: other current sessions than the users' (``hist``, ``hlen``, ... by name)."""
        own = sessions or self._user_state()
        return (self.gap_ms, self.config.session_rules_window, own["hist"], own["hlen"], own["last_ts"], own["skey"],
                own["serial"], self.next_serial, self.rules.rows, self.rules.weights, self.rules.errors, self.rules.clock,
                self.cooc.rows, self.cooc.weights, self.cooc.errors, self.cooc.clock, self.rules.half_life_ms,
                self.ring.items, self.ring.lengths, self.ring.times, self.ring.serials, self.ring.item_serials,
                self.ring.item_heads, self.repeats)

    def score_args(self, scratch: tuple | None = None) -> tuple:
        """The arrays ``session_scores`` takes after the user, time and key (``scratch``: another
        thread's work arrays, from ``_new_scratch``)."""
        acc, touched, tmark, n_touched, session_buf, knn_scratch, calls = scratch or (
            self.acc, self.touched, self.tmark, self.n_touched, self.session_buf, self.knn_scratch, self.calls)
        return (self.gap_ms, self.config.session_query_window, self.weights, self.hist, self.hlen, self.last_ts,
                self.skey, self.serial, self.rules.rows, self.rules.weights, self.rules.errors, self.cooc.rows,
                self.cooc.weights, self.cooc.errors,
                self.ring.items, self.ring.lengths, self.ring.times, self.ring.serials, self.ring.item_serials,
                self.ring.item_heads, self.ring.sample, self.ring.k, acc, touched, tmark,
                n_touched, session_buf, knn_scratch, calls, self.repeats)

    def update(self, user_rows: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray,
               session_keys: np.ndarray | None = None) -> None:
        """Learn events in order: ``session_keys`` (int64, 0 = none) mark sessions; without them a
        user's gap over ``session_gap_s`` starts a new one."""
        self.learn_waiting()
        if len(user_rows) == 0:
            return
        users, items = np.asarray(user_rows, dtype=np.int64), np.asarray(item_rows, dtype=np.int64)
        self.fit(int(users.max()) + 1, int(items.max()) + 1)
        keys = np.zeros(len(users), np.int64) if session_keys is None else np.asarray(session_keys, dtype=np.int64)
        ts = np.asarray(timestamps, dtype=np.int64)
        serials = np.empty(len(users), np.int64) if self.sharing else _NO_SERIALS
        learn_batch(users, items, ts, keys, self.learn_args(), serials)
        if self.sharing:
            self._unsent.append((serials, items.copy(), ts.copy()))

    # -- sharing with a consumer group ---------------------------------------------------------

    def share(self) -> None:
        """Record the clicks learned from now on for the group (:meth:`take_clicks`)."""
        self.sharing = True

    def _unsent_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._unsent:
            return _NO_SERIALS, _NO_SERIALS, _NO_SERIALS
        return tuple(np.concatenate(column) for column in zip(*self._unsent))

    def take_clicks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The clicks learned since the last call, in order: each one's session serial (unique
        among this member's sessions), item row and time; those the group already has
        (:meth:`count_as_sent`) left out."""
        serials, rows, ts = self._unsent_arrays()
        self._unsent = []
        skip = min(self._sent_ahead, len(serials))
        self._sent_ahead -= skip
        return serials[skip:], rows[skip:], ts[skip:]

    def count_as_sent(self, clicks: int) -> None:
        """The next ``clicks`` clicks to be taken are in the group already: this member sent them
        after the checkpoint it was restored from, and learns them again from the replayed input."""
        self._sent_ahead += clicks

    def learn_remote(self, session_keys: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray) -> None:
        """Learn another member's clicks, in its order: rules, co-occurrence and the session ring
        learn them as this member's own, from sessions kept apart from its users'
        (``session_keys``: positive, one per session in the group, see :meth:`remote_keys`).

        Users are partitioned across the group, so each user's current session is on one member
        and needs no sharing; what the signals learn from it about items does.
        """
        if len(item_rows) == 0 or not self.enabled:
            return
        self._remote_waiting.append(tuple(np.asarray(column, dtype=np.int64).copy()
                                          for column in (session_keys, item_rows, timestamps)))

    def learn_waiting(self) -> None:
        """Learn the clicks :meth:`learn_remote` was given. Whatever reads or learns the signals
        here calls this first, :meth:`update` included: so they are learned on the learning thread
        beside the model (see :meth:`learning`), not in the thread that reads the sync topic."""
        if not self._remote_waiting:
            return
        keys, items, ts = (np.concatenate(column) for column in zip(*self._remote_waiting))
        self._remote_waiting = []
        self.fit(0, int(items.max()) + 1)
        if self._remote is None:
            self._remote = {name: np.zeros((_REMOTE_SESSIONS, *getattr(self, name).shape[1:]), dtype=dtype)
                            for name, dtype in _USER_STATE}
        learn_batch(keys % _REMOTE_SESSIONS, items, ts, keys, self.learn_args(self._remote), _NO_SERIALS)

    @staticmethod
    def remote_keys(member: str, serials: np.ndarray) -> np.ndarray:
        """A positive key per session of ``member``'s ``serials``, the same on every member
        (members number their sessions each on their own; the key tells them apart).

        >>> keys = SessionSignals.remote_keys("a", np.array([1, 2, 1]))
        >>> bool((keys > 0).all()), bool(keys[0] == keys[2]), bool(keys[0] == SessionSignals.remote_keys("b", [1])[0])
        (True, True, False)
        """
        salt = np.uint64(int.from_bytes(hashlib.blake2b(member.encode(), digest_size=8).digest(), "little"))
        mixed = (np.asarray(serials, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ salt
        return ((mixed >> np.uint64(1)) | np.uint64(1)).astype(np.int64)

    @contextmanager
    def learning(self, user_rows: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray,
                 session_keys: np.ndarray | None = None) -> Iterator[None]:
        """:meth:`update` on a worker thread while the caller's block runs; done when the block is.

        The session signals share no array with the factor model, and both kernels release the
        GIL, so the model learns the same batch on the other core meanwhile; the result is the
        one ``update`` gives. Inside the block the caller must not touch these signals. A small
        batch is learned at once, before the block.
        """
        if len(user_rows) < _BACKGROUND_MIN_EVENTS:
            self.update(user_rows, item_rows, timestamps, session_keys)
            yield
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="session-learning")
        learned = self._worker.submit(self.update, user_rows, item_rows, timestamps, session_keys)
        try:
            yield
        finally:
            learned.result()  # (re-raises what the update raised)

    def candidates(self, user_rows: np.ndarray, now_ms: int | np.ndarray = 0,
                   session_keys: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user: the item rows the session signals reach and their blended score.

        ``now_ms`` (event time, one or per user): a session whose last event is older than
        ``session_gap_s`` is over and gives nothing; 0 means "at the user's last event".
        """
        start, rows, scores = self.candidates_csr(user_rows, now_ms, session_keys)
        return [(rows[a:b], scores[a:b]) for a, b in zip(start[:-1].tolist(), start[1:].tolist())]

    def candidates_csr(self, user_rows: np.ndarray, now_ms: int | np.ndarray = 0,
                       session_keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`candidates` as one array each: user ``n`` reaches ``rows[start[n]:start[n + 1]]``
        with blends ``scores[start[n]:start[n + 1]]``.

        Users are scored by as many threads as numba uses (the kernel releases the GIL), each with
        its own work arrays: a publishing round then uses the cores the consumer leaves idle.
        """
        self.learn_waiting()
        users = np.asarray(user_rows, dtype=np.int64)
        if len(users) == 0 or not self.enabled:
            return np.zeros(len(users) + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        self.fit(int(users.max()) + 1, 1)
        now = np.asarray(now_ms, dtype=np.int64)
        now = np.where(now > 0, now, self.last_ts[users]) if now.ndim or now <= 0 else np.full(len(users), now)
        keys = self.skey[users] if session_keys is None else np.asarray(session_keys, dtype=np.int64)
        threads = min(numba.get_num_threads(), max(1, len(users) // _USERS_PER_THREAD))
        if threads == 1:
            ends, rows, scores = self._candidates_chunk(users, now, keys, self.score_args())
        else:
            while len(self._thread_scratch) < threads - 1:
                items = len(self.tmark)
                self._thread_scratch.append(self._new_scratch(items, self.ring.new_scratch(items, self.length)))
            # Every threads-th user to each thread: a user's cost follows their session and history,
            # and rows run from the oldest users to the newest, so halves would not be even.
            with ThreadPoolExecutor(threads) as pool:
                parts = list(pool.map(
                    lambda t: self._candidates_chunk(users[t::threads], now[t::threads], keys[t::threads],
                                                     self.score_args(self._thread_scratch[t - 1] if t else None)),
                    range(threads)))
            counts = np.zeros(len(users), dtype=np.int64)
            for t, (part_ends, _, _) in enumerate(parts):
                counts[t::threads] = np.diff(part_ends, prepend=0)
            start = np.zeros(len(users) + 1, dtype=np.int64)
            np.cumsum(counts, out=start[1:])
            rows, scores = np.empty(start[-1], np.int64), np.empty(start[-1], np.float64)
            for t, (part_ends, part_rows, part_scores) in enumerate(parts):
                part_counts = counts[t::threads]
                # where each of this thread's entries goes: its user's start, plus its place among theirs
                at = np.repeat(start[:-1][t::threads] - (part_ends - part_counts), part_counts) + np.arange(len(part_rows))
                rows[at], scores[at] = part_rows, part_scores
            return start, rows, scores
        start = np.zeros(len(users) + 1, dtype=np.int64)
        start[1:] = ends
        return start, rows, scores

    @staticmethod
    def _candidates_chunk(users: np.ndarray, now: np.ndarray, keys: np.ndarray, score_args: tuple
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``candidates_batch`` over ``users``: each user's end in the rows and scores, which grow
        until every user's items fit."""
        ends = np.zeros(len(users), np.int64)
        size = max(256, _ROWS_PER_USER * len(users))
        rows, scores = np.empty(size, np.int64), np.empty(size, np.float64)
        done, used = 0, 0
        while done < len(users):
            out_n = np.zeros(len(users) - done, np.int64)
            stop = candidates_batch(users[done:], now[done:], keys[done:], score_args, rows[used:], scores[used:],
                                    out_n)
            ends[done:done + stop] = out_n[:stop] + used
            used = int(ends[done + stop - 1]) if stop else used
            done += stop
            if done < len(users):  # out of room: twice the buffers, keeping what is written
                rows = np.concatenate([rows[:used], np.empty(2 * len(rows), np.int64)])
                scores = np.concatenate([scores[:used], np.empty(2 * len(scores), np.float64)])
        return ends, rows[:used], scores[:used]

    def bytes_per_item(self) -> int:
        """Memory the signals hold per item (rules, co-occurrence, item -> session index, scratch)."""
        return (self.rules.bytes_per_item() + self.cooc.bytes_per_item() + self.ring.bytes_per_item()
                + self.acc.itemsize * self.acc.shape[0] + 2 * 8 + 16)

    def to_arrays(self, users: int, items: int) -> dict[str, np.ndarray]:
        """Everything the signals learned, as named arrays (copies)."""
        self.learn_waiting()
        self.fit(users, items)
        out = {name: getattr(self, name)[:users].copy() for name, _ in _USER_STATE}
        out["next_serial"] = self.next_serial.copy()
        out["repeats"] = self.repeats.copy()
        if self._remote is not None:
            out.update({f"remote.{name}": values.copy() for name, values in self._remote.items()})
        serials, rows, ts = self._unsent_arrays()
        out.update({"unsent.serials": serials, "unsent.items": rows, "unsent.ts": ts,
                    "unsent.sent_ahead": np.array([self._sent_ahead], dtype=np.int64)})
        out.update({f"rules.{k}": v for k, v in self.rules.to_arrays(items).items()})
        out.update({f"cooc.{k}": v for k, v in self.cooc.to_arrays(items).items()})
        out.update({f"ring.{k}": v for k, v in self.ring.to_arrays(items).items()})
        return out

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`to_arrays` output (states from before session signals have none: they start empty)."""
        if "hlen" not in arrays:
            return
        users = len(arrays["hlen"])
        if arrays["hist"].shape[1] != self.length:
            arrays = {**arrays, "hlen": np.zeros(users, np.int64)}  # a changed session length: sessions restart
            arrays["hist"] = np.zeros((users, self.length), np.int32)
        for name, dtype in _USER_STATE:
            stored = np.asarray(arrays[name], dtype=dtype)
            full = np.zeros((max(users, 1024), *stored.shape[1:]), dtype=dtype)
            full[:users] = stored
            setattr(self, name, full)
        self.next_serial = np.array(arrays["next_serial"], dtype=np.int64).reshape(1)
        self.repeats = np.array(arrays["repeats"], dtype=np.float64).reshape(2)
        remote = {name: np.asarray(arrays[f"remote.{name}"], dtype=dtype) for name, dtype in _USER_STATE
                  if f"remote.{name}" in arrays}
        # (a changed session length restarts the other members' sessions too)
        self._remote = remote if len(remote) == len(_USER_STATE) and remote["hist"].shape[1] == self.length else None
        self._remote_waiting = []
        if "unsent.serials" in arrays:  # (older checkpoints: nothing unsent)
            self._unsent = [tuple(np.asarray(arrays[f"unsent.{k}"], dtype=np.int64) for k in ("serials", "items", "ts"))]
            self._sent_ahead = int(arrays["unsent.sent_ahead"][0])
        self.rules.load_arrays({k[6:]: v for k, v in arrays.items() if k.startswith("rules.")})
        self.cooc.load_arrays({k[5:]: v for k, v in arrays.items() if k.startswith("cooc.")})
        self.ring.load_arrays({k[5:]: v for k, v in arrays.items() if k.startswith("ring.")})
        self._items = 0
        self.fit(users, len(self.rules.rows))
