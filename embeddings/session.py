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
>>> signals = SessionSignals(MFConfig(session_half_life_s=0))  # no decay: plain counts
>>> users, items = np.zeros(4, np.int64), np.array([0, 1, 0, 1])  # one session: 0 1 0 1
>>> signals.update(users, items, np.arange(4, dtype=np.int64) * 1000)
>>> rows, weights = signals.rules.neighbours(0)
>>> sorted(zip(rows.tolist(), weights.tolist()))  # 0 -> 1 twice at gap 1, once at gap 3; 0 -> 0 at gap 2
[(0, 0.5), (1, 2.3333332538604736)]
>>> rows, scores = signals.candidates(np.array([0]), 3000)[0]
>>> int(rows[np.argmax(scores)])  # after ... 0 1, item 0 comes next
0
"""

from __future__ import annotations

import numpy as np
from numba import njit
from recstream.embeddings.item_neighbours import ItemNeighbours, add_pair
from recstream.embeddings.session_knn import RecentSessions, ring_add, ring_score, touch

N_SIGNALS = 4  # rules, co-occurrence, neighbourhood, repeat
# The share of next clicks that re-view a session item is a running mean over about this many
# clicks; the repeat signal is weighted by its odds (1 before any click: the prior is [1, 2]).
_REPEAT_KEEP = 1.0 - 1.0 / 10_000
_MAX_REPEAT_ODDS = 4.0
# Positions in SessionSignals.score_args() of what the kernels read besides session_scores.
GAP_MS, HIST, HLEN, LAST_TS, SKEY, SERIAL = 0, 3, 4, 5, 6, 7
ACC, TOUCHED, N_TOUCHED, SESSION_BUF = 22, 23, 25, 26
# Kernels that call other modules' kernels are not cached on disk: numba's cache checks only the
# source file of the function it caches, so it would keep running the old code of a changed callee.
# They compile once per process instead (a few seconds).


@njit(cache=True, nogil=True, inline="always")
def _in_session(u, t, key, gap_ms, serial, last_ts, skey):
    """Does an event of user ``u`` at ``t`` with session key ``key`` continue their current session?"""
    if serial[u] == 0:
        return False
    if key != 0 or skey[u] != 0:
        return key == skey[u]
    return t - last_ts[u] <= gap_ms


@njit(cache=False, nogil=True)  # calls other modules' kernels: not cached (see above)
def _learn_event(u, x, t, key, gap_ms, window, hist, hlen, last_ts, skey, serial, next_serial,
                 r_rows, r_w, r_e, r_clock, c_rows, c_w, c_e, c_clock, half_life_ms,
                 s_items, s_len, s_times, s_serials, i_serials, i_heads, repeats):
    length = hist.shape[1]
    if not _in_session(u, t, key, gap_ms, serial, last_ts, skey):
        next_serial[0] += 1
        serial[u] = next_serial[0]
        hlen[u] = 0
        skey[u] = key
    else:  # how often a session's next click is one of its own items: the repeat signal's weight
        again = 0.0
        for i in range(1, min(hlen[u], length) + 1):
            if hist[u, (hlen[u] - i) % length] == x:
                again = 1.0
                break
        repeats[0] = repeats[0] * _REPEAT_KEEP + again
        repeats[1] = repeats[1] * _REPEAT_KEEP + 1.0
    for i in range(1, min(hlen[u], window, length) + 1):
        y = hist[u, (hlen[u] - i) % length]
        add_pair(r_rows, r_w, r_e, r_clock, half_life_ms, y, x, 1.0 / i, t)
        add_pair(c_rows, c_w, c_e, c_clock, half_life_ms, y, x, 1.0, t)
        if y != x:
            add_pair(c_rows, c_w, c_e, c_clock, half_life_ms, x, y, 1.0, t)
    hist[u, hlen[u] % length] = x
    hlen[u] += 1
    last_ts[u] = max(last_ts[u], t)
    ring_add(s_items, s_len, s_times, s_serials, i_serials, i_heads, serial[u], x, t)


@njit(cache=False, nogil=True)  # calls other modules' kernels: not cached (see above)
def _learn_batch(users, items, ts, keys, learn_args):
    for e in range(len(users)):
        _learn_event(users[e], items[e], ts[e], keys[e], *learn_args)


@njit(cache=False, nogil=True)  # calls other modules' kernels: not cached (see above)
def session_scores(u, t, key, gap_ms, qwindow, weights, hist, hlen, last_ts, skey, serial,
                   r_rows, r_w, r_e, c_rows, c_w, c_e, s_items, s_len, s_times, s_serials, i_serials, i_heads, sample, k,
                   acc, touched, tmark, n_touched, session_buf, knn_scratch, calls, repeats):
    """The blended session score of every item the signals reach for user ``u`` at ``t``.

    Leaves those items in ``touched[:n_touched[0]]``, each signal in ``acc[0..3]`` and the
    blend in ``acc[4]``; the caller reads them, then zeroes them with ``clear_scores``.
    Outside a session nothing is touched.
    """
    n_touched[0] = 0
    if hlen[u] == 0 or not _in_session(u, t, key, gap_ms, serial, last_ts, skey):
        return
    length = hist.shape[1]
    m = min(hlen[u], length)
    for p in range(m):  # oldest first
        session_buf[p] = hist[u, (hlen[u] - m + p) % length]
    calls[0] += 1
    stamp = calls[0]
    n_nb = r_rows.shape[1]
    for i in range(1, min(m, qwindow) + 1):  # sequential rules of the last clicks
        y = session_buf[m - i]
        top = 0.0
        for c in range(n_nb):
            if r_rows[y, c] >= 0:
                top = max(top, r_w[y, c] - r_e[y, c])
        if top > 0.0:
            for c in range(n_nb):
                x = r_rows[y, c]
                if x < 0:
                    break
                touch(x, touched, tmark, stamp, n_touched)
                acc[0, x] += (r_w[y, c] - r_e[y, c]) / (i * top)
    for p in range(m):  # co-occurrence with every click, later ones weighing more
        y = session_buf[p]
        top = 0.0
        for c in range(n_nb):
            if c_rows[y, c] >= 0:
                top = max(top, c_w[y, c] - c_e[y, c])
        if top > 0.0:
            for c in range(n_nb):
                x = c_rows[y, c]
                if x < 0:
                    break
                touch(x, touched, tmark, stamp, n_touched)
                acc[1, x] += (p + 1.0) / m * (c_w[y, c] - c_e[y, c]) / top
    if weights[2] > 0.0:
        ring_score(s_items, s_len, s_times, s_serials, i_serials, i_heads, session_buf[:m], serial[u], sample, k,
                   acc[2], touched, tmark, stamp, n_touched, knn_scratch[0], knn_scratch[1], knn_scratch[2],
                   knn_scratch[3], knn_scratch[4], knn_scratch[5], knn_scratch[6])
    for j in range(m):  # repeats: 1 / steps back, summed over the item's clicks
        x = session_buf[m - 1 - j]
        touch(x, touched, tmark, stamp, n_touched)
        acc[3, x] += 1.0 / (j + 1.0)
    n = n_touched[0]
    for f in range(N_SIGNALS):
        top = 0.0
        for j in range(n):
            top = max(top, acc[f, touched[j]])
        if top > 0.0:
            scale = weights[f] / top
            if f == N_SIGNALS - 1:  # the repeat signal, by the odds that the next click is a re-view
                scale *= min(repeats[0] / max(repeats[1] - repeats[0], 1e-9), _MAX_REPEAT_ODDS)
            for j in range(n):
                x = touched[j]
                acc[N_SIGNALS, x] += scale * acc[f, x]


@njit(cache=True, nogil=True)
def clear_scores(acc, touched, n):
    for j in range(n):
        x = touched[j]
        for f in range(acc.shape[0]):
            acc[f, x] = 0.0


@njit(cache=False, nogil=True)  # calls other modules' kernels: not cached (see above)
def _candidates_batch(users, now, keys, score_args, out_rows, out_scores, out_n):
    """``session_scores`` for each user; the reached items and blends go to ``out_*`` (CSR by ``out_n``)."""
    acc, touched, n_touched = score_args[ACC], score_args[TOUCHED], score_args[N_TOUCHED]
    n_out = 0
    for e in range(len(users)):
        session_scores(users[e], now[e], keys[e], *score_args)
        n = n_touched[0]
        if n_out + n > len(out_rows):
            clear_scores(acc, touched, n)
            return e  # out of room: the caller grows the buffers and goes on from here
        for j in range(n):
            out_rows[n_out + j] = touched[j]
            out_scores[n_out + j] = acc[N_SIGNALS, touched[j]]
        n_out += n
        out_n[e] = n_out
        clear_scores(acc, touched, n)
    return len(users)


_USER_STATE = (("hist", np.int32), ("hlen", np.int64), ("last_ts", np.int64), ("skey", np.int64),
               ("serial", np.int64))


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
        self._fit_scratch(1024)

    @property
    def enabled(self) -> bool:
        return bool(self.weights.any())

    def _fit_scratch(self, items: int) -> None:
        self.acc = np.zeros((N_SIGNALS + 1, items), dtype=np.float64)
        self.touched = np.zeros(items, dtype=np.int64)
        self.tmark = np.zeros(items, dtype=np.int64)
        self.n_touched = np.zeros(1, dtype=np.int64)
        self.session_buf = np.zeros(self.length, dtype=np.int64)
        self.calls = np.zeros(1, dtype=np.int64)
        self.knn_scratch = self.ring.scratch(items, self.length)

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

    def learn_args(self) -> tuple:
        """The arrays the learning kernel takes after the events (see ``_learn_event``)."""
        return (self.gap_ms, self.config.session_rules_window, self.hist, self.hlen, self.last_ts, self.skey,
                self.serial, self.next_serial, self.rules.rows, self.rules.weights, self.rules.errors, self.rules.clock,
                self.cooc.rows, self.cooc.weights, self.cooc.errors, self.cooc.clock, self.rules.half_life_ms,
                self.ring.items, self.ring.lengths, self.ring.times, self.ring.serials, self.ring.item_serials,
                self.ring.item_heads, self.repeats)

    def score_args(self) -> tuple:
        """The arrays ``session_scores`` takes after the user, time and key."""
        return (self.gap_ms, self.config.session_query_window, self.weights, self.hist, self.hlen, self.last_ts,
                self.skey, self.serial, self.rules.rows, self.rules.weights, self.rules.errors, self.cooc.rows,
                self.cooc.weights, self.cooc.errors,
                self.ring.items, self.ring.lengths, self.ring.times, self.ring.serials, self.ring.item_serials,
                self.ring.item_heads, self.ring.sample, self.ring.k, self.acc, self.touched, self.tmark,
                self.n_touched, self.session_buf, self.knn_scratch, self.calls, self.repeats)

    def update(self, user_rows: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray,
               session_keys: np.ndarray | None = None) -> None:
        """Learn events in order: ``session_keys`` (int64, 0 = none) mark sessions; without them a
        user's gap over ``session_gap_s`` starts a new one."""
        if len(user_rows) == 0:
            return
        users, items = np.asarray(user_rows, dtype=np.int64), np.asarray(item_rows, dtype=np.int64)
        self.fit(int(users.max()) + 1, int(items.max()) + 1)
        keys = np.zeros(len(users), np.int64) if session_keys is None else np.asarray(session_keys, dtype=np.int64)
        _learn_batch(users, items, np.asarray(timestamps, dtype=np.int64), keys, self.learn_args())

    def candidates(self, user_rows: np.ndarray, now_ms: int | np.ndarray = 0,
                   session_keys: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user: the item rows the session signals reach and their blended score.

        ``now_ms`` (event time, one or per user): a session whose last event is older than
        ``session_gap_s`` is over and gives nothing; 0 means "at the user's last event".
        """
        users = np.asarray(user_rows, dtype=np.int64)
        if len(users) == 0 or not self.enabled:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float64)) for _ in range(len(users))]
        self.fit(int(users.max()) + 1, 1)
        now = np.asarray(now_ms, dtype=np.int64)
        now = np.where(now > 0, now, self.last_ts[users]) if now.ndim or now <= 0 else np.full(len(users), now)
        keys = self.skey[users] if session_keys is None else np.asarray(session_keys, dtype=np.int64)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        size = max(256, 64 * len(users))
        done = 0
        while done < len(users):  # the buffers grow until a user's items fit
            out_rows, out_scores = np.empty(size, np.int64), np.empty(size, np.float64)
            out_n = np.zeros(len(users) - done, np.int64)
            stop = _candidates_batch(users[done:], now[done:], keys[done:], self.score_args(), out_rows, out_scores, out_n)
            start = 0
            for end in out_n[:stop].tolist():
                out.append((out_rows[start:end], out_scores[start:end]))
                start = end
            done += stop
            size *= 2
        return out

    def bytes_per_item(self) -> int:
        """Memory the signals hold per item (rules, co-occurrence, item -> session index, scratch)."""
        return (self.rules.bytes_per_item() + self.cooc.bytes_per_item() + self.ring.bytes_per_item()
                + self.acc.itemsize * self.acc.shape[0] + 2 * 8 + 16)

    def to_arrays(self, users: int, items: int) -> dict[str, np.ndarray]:
        """Everything the signals learned, as named arrays (copies)."""
        self.fit(users, items)
        out = {name: getattr(self, name)[:users].copy() for name, _ in _USER_STATE}
        out["next_serial"] = self.next_serial.copy()
        out["repeats"] = self.repeats.copy()
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
        self.rules.load_arrays({k[6:]: v for k, v in arrays.items() if k.startswith("rules.")})
        self.cooc.load_arrays({k[5:]: v for k, v in arrays.items() if k.startswith("cooc.")})
        self.ring.load_arrays({k[5:]: v for k, v in arrays.items() if k.startswith("ring.")})
        self._items = 0
        self.fit(users, len(self.rules.rows))
