"""The compiled kernels of the session signals, in one file.

numba's on-disk cache checks only the source file a kernel is defined in, so
a cached kernel calling a kernel of another file would keep running that
callee's old code after it changed. Keeping every session kernel here keeps
the cache right; the classes and the equations live in embeddings.item_neighbours
(pair weights), embeddings.session_knn (the session ring), embeddings.session
(the signals and their blend) and evaluation.session (the protocol).
"""

from __future__ import annotations

import numpy as np
from numba import njit

K = 20  # cut-off of the session protocol's metrics

_RESCALE_AT = 30.0  # half-lives past the reference time before weights are rescaled (2^30 in float32 is exact enough)


@njit(cache=True, nogil=True)
def add_pair(rows, weights, errors, clock, half_life_ms, y, x, gain, t):
    """Add ``gain`` at event time ``t`` to the pair ``y -> x`` (``clock``: reference time, float64[1]).

    ``weights`` hold upper bounds, ``errors`` how much of them may not be the pair's own."""
    if half_life_ms > 0.0:
        exponent = (t - clock[0]) / half_life_ms
        if exponent > _RESCALE_AT:
            factor = np.float32(2.0 ** -exponent)
            for r in range(rows.shape[0]):
                for c in range(rows.shape[1]):
                    weights[r, c] *= factor
                    errors[r, c] *= factor
            clock[0] = t
            exponent = 0.0
        gain = gain * 2.0 ** max(exponent, -_RESCALE_AT)  # an out-of-order old event counts a little, never NaN
    row = rows[y]
    w = weights[y]
    weakest = 0
    for c in range(row.shape[0]):
        if row[c] == x:
            w[c] += gain
            return
        if row[c] < 0:  # free slots are filled left to right: x is not further on
            row[c] = x
            w[c] = gain
            errors[y, c] = 0.0
            return
        if w[c] < w[weakest]:
            weakest = c
    row[weakest] = x
    errors[y, weakest] = w[weakest]
    w[weakest] += gain


@njit(cache=True, nogil=True)
def add_pairs(rows, weights, errors, clock, half_life_ms, ys, xs, gains, ts):
    for e in range(len(ys)):
        add_pair(rows, weights, errors, clock, half_life_ms, ys[e], xs[e], gains[e], ts[e])

@njit(cache=True, nogil=True)
def ring_add(items, lengths, times, serials, item_serials, item_heads, serial, x, t):
    """Record that session ``serial`` clicked item ``x`` at time ``t`` (a new serial takes the next slot)."""
    capacity, length = items.shape
    slot = serial % capacity
    if serials[slot] != serial:  # a new session: take over the slot
        serials[slot] = serial
        lengths[slot] = 0
    times[slot] = t
    row = items[slot]
    for c in range(lengths[slot]):
        if row[c] == x:  # already in the session: move it to the end (newest)
            for d in range(c, lengths[slot] - 1):
                row[d] = row[d + 1]
            row[lengths[slot] - 1] = x
            return
    if lengths[slot] == length:  # full: forget the oldest item
        for d in range(length - 1):
            row[d] = row[d + 1]
        lengths[slot] -= 1
    row[lengths[slot]] = x
    lengths[slot] += 1
    per_item = item_serials.shape[1]
    head = item_heads[x]
    item_serials[x, head % per_item] = serial
    item_heads[x] = head + 1


@njit(cache=True, nogil=True, inline="always")
def touch(x, touched, tmark, stamp, n_touched):
    """Append ``x`` to ``touched`` unless ``tmark[x]`` already holds this call's ``stamp``."""
    if tmark[x] != stamp:
        tmark[x] = stamp
        touched[n_touched[0]] = x
        n_touched[0] += 1


@njit(cache=True, nogil=True)
def ring_score(items, lengths, times, serials, item_serials, item_heads, session, own_serial, sample, k, out,
               touched, tmark, tstamp, n_touched, weight_of, mark, seen_slot, candidates, cand_time, sims, calls):
    """Add V-SKNN scores for the session ``session`` (item rows, oldest first) to ``out``, listing the
    items reached in ``touched`` (see ``touch``).

    ``weight_of``/``mark`` (per item) and ``seen_slot`` (per slot) are scratch arrays
    marked with the call's number (``calls``, int64[1]) so nothing has to be cleared between calls;
    ``candidates``, ``cand_time``, ``sims`` hold at least ``len(session) * per_item``.
    """
    capacity = items.shape[0]
    per_item = item_serials.shape[1]
    m = len(session)
    if m == 0:
        return
    calls[0] += 1
    stamp = calls[0]
    for p in range(m):  # 1-based positions; a repeated item keeps its last one
        x = session[p]
        weight_of[x] = p + 1.0
        mark[x] = stamp
    n_cand = 0
    for p in range(m):
        x = session[p]
        if p < m - 1:
            duplicate = False
            for q in range(p + 1, m):
                if session[q] == x:
                    duplicate = True
                    break
            if duplicate:
                continue
        head = item_heads[x]
        for j in range(min(head, per_item)):
            serial = item_serials[x, (head - 1 - j) % per_item]
            slot = serial % capacity
            if serial == own_serial or serials[slot] != serial or seen_slot[slot] == stamp:
                continue
            seen_slot[slot] = stamp
            candidates[n_cand] = slot
            cand_time[n_cand] = times[slot]
            n_cand += 1
    if n_cand > sample:  # keep the most recent
        picked = candidates[np.argsort(-cand_time[:n_cand], kind="mergesort")[:sample]]
        candidates[:sample] = picked
        n_cand = sample
    for j in range(n_cand):  # similarity, and the newest shared position (reusing cand_time)
        slot = candidates[j]
        s = 0.0
        newest = 0.0
        for c in range(lengths[slot]):
            x = items[slot, c]
            if mark[x] == stamp:
                s += weight_of[x]
                newest = max(newest, weight_of[x])
        sims[j] = s / (m * m)
        cand_time[j] = int(newest)
    cutoff = 0.0  # the k-th largest similarity: the k nearest are those above it, then the first ties
    room_at_cutoff = n_cand
    if n_cand > k:
        cutoff = -np.partition(-sims[:n_cand], k - 1)[k - 1]
        room_at_cutoff = k
        for j in range(n_cand):
            room_at_cutoff -= sims[j] > cutoff
    for j in range(n_cand):
        sim = sims[j]
        if sim <= 0.0 or sim < cutoff:
            continue
        if sim == cutoff:
            if room_at_cutoff == 0:
                continue
            room_at_cutoff -= 1
        slot = candidates[j]
        gain = sim / (m + 1.0 - cand_time[j])  # 1 / steps back to the newest shared click
        for c in range(lengths[slot]):
            x = items[slot, c]
            touch(x, touched, tmark, tstamp, n_touched)
            out[x] += gain

N_SIGNALS = 4  # rules, co-occurrence, neighbourhood, repeat
# The share of next clicks that re-view a session item is a running mean over about this many
# clicks; the repeat signal is weighted by its odds (1 before any click: the prior is [1, 2]).
_REPEAT_KEEP = 1.0 - 1.0 / 10_000
_MAX_REPEAT_ODDS = 4.0
# Positions in SessionSignals.score_args() of what the kernels read besides session_scores.
GAP_MS, HIST, HLEN, LAST_TS, SKEY, SERIAL = 0, 3, 4, 5, 6, 7
# ... and of what learn_event takes after the event (SessionSignals.learn_args()).
LEARN_HIST, LEARN_SERIAL = 2, 6
ACC, TOUCHED, N_TOUCHED, SESSION_BUF = 22, 23, 25, 26


@njit(cache=True, nogil=True, inline="always")
def in_session(u, t, key, gap_ms, serial, last_ts, skey):
    """Does an event of user ``u`` at ``t`` with session key ``key`` continue their current session?"""
    if serial[u] == 0:
        return False
    if key != 0 or skey[u] != 0:
        return key == skey[u]
    return t - last_ts[u] <= gap_ms


@njit(cache=True, nogil=True)
def learn_event(u, x, t, key, gap_ms, window, hist, hlen, last_ts, skey, serial, next_serial,
                 r_rows, r_w, r_e, r_clock, c_rows, c_w, c_e, c_clock, half_life_ms,
                 s_items, s_len, s_times, s_serials, i_serials, i_heads, repeats):
    length = hist.shape[1]
    if not in_session(u, t, key, gap_ms, serial, last_ts, skey):
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


@njit(cache=True, nogil=True)
def learn_batch(users, items, ts, keys, learn_args, out_serials):
    """``learn_event`` for each event in order; with ``out_serials`` as long as the events, each
    event's session serial goes there (what the group sync sends in place of the user)."""
    serial = learn_args[LEARN_SERIAL]
    record = len(out_serials) == len(users)
    for e in range(len(users)):
        learn_event(users[e], items[e], ts[e], keys[e], *learn_args)
        if record:
            out_serials[e] = serial[users[e]]


@njit(cache=True, nogil=True)
def session_scores(u, t, key, gap_ms, qwindow, weights, hist, hlen, last_ts, skey, serial,
                   r_rows, r_w, r_e, c_rows, c_w, c_e, s_items, s_len, s_times, s_serials, i_serials, i_heads, sample, k,
                   acc, touched, tmark, n_touched, session_buf, knn_scratch, calls, repeats):
    """The blended session score of every item the signals reach for user ``u`` at ``t``.

    Leaves those items in ``touched[:n_touched[0]]``, each signal in ``acc[0..3]`` and the
    blend in ``acc[4]``; the caller reads them, then zeroes them with ``clear_scores``.
    Outside a session nothing is touched.
    """
    n_touched[0] = 0
    if hlen[u] == 0 or not in_session(u, t, key, gap_ms, serial, last_ts, skey):
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


@njit(cache=True, nogil=True)
def candidates_batch(users, now, keys, score_args, out_rows, out_scores, out_n):
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

@njit(cache=True, nogil=True)
def expected_hit_rr(greater, ties, k):
    """Expected hit@k and reciprocal rank (0 past k) of an item with ``greater`` items scored
    above it and ``ties`` others equal, its place among the tied drawn at random.

    >>> from recstream.embeddings.session_kernels import expected_hit_rr  # numba caches by file: compile it
    >>> [round(float(x), 3) for x in expected_hit_rr(0, 1, 20)]  # rank 1 or 2
    [1.0, 0.75]
    >>> [round(float(x), 3) for x in expected_hit_rr(19, 1, 20)]  # rank 20 or 21
    [0.5, 0.025]
    """
    if greater >= k:
        return 0.0, 0.0
    last = min(greater + ties, k - 1)
    share = 1.0 / (ties + 1.0)
    rr = 0.0
    for r in range(greater, last + 1):
        rr += 1.0 / (r + 1.0)
    return (last - greater + 1) * share, rr * share

@njit(cache=True, nogil=True)
def rank_then_learn(users, items, ts, keys, known, new, mf_row, mf, mf_weight, out, score_args, learn_args):
    """Rank each event's item by ``mf_weight * mf[mf_row[e]] + session blend``, then learn it into the
    session signals. ``new[e]``: the item is new to the session. ``out[e]``: evaluated, hit, rr,
    evaluated_new, hit_new, rr_new."""
    gap_ms, hist, hlen, last_ts = score_args[GAP_MS], score_args[HIST], score_args[HLEN], score_args[LAST_TS]
    skey, serial = score_args[SKEY], score_args[SERIAL]
    acc, touched = score_args[ACC], score_args[TOUCHED]
    n_touched, session_buf = score_args[N_TOUCHED], score_args[SESSION_BUF]
    length = hist.shape[1]
    for e in range(len(users)):
        u, x, t = users[e], items[e], ts[e]
        if mf_row[e] >= 0 and hlen[u] > 0 and in_session(u, t, keys[e], gap_ms, serial, last_ts, skey):
            session_scores(u, t, keys[e], *score_args)
            blend = acc[N_SIGNALS]
            scores = mf[mf_row[e]]
            target = mf_weight * scores[x] + blend[x]
            greater = 0
            ties = 0
            for j in range(known[e]):
                s = mf_weight * scores[j] + blend[j]
                if s > target:
                    greater += 1
                elif s == target:
                    ties += 1
            hit, rr = expected_hit_rr(greater, ties - 1, K)
            out[e, 0], out[e, 1], out[e, 2] = 1.0, hit, rr
            if new[e]:
                for p in range(min(hlen[u], length)):  # leave out the session's (kept) items, each once
                    y = session_buf[p]
                    first = True
                    for q in range(p):
                        if session_buf[q] == y:
                            first = False
                    if first:
                        s = mf_weight * scores[y] + blend[y]
                        if s > target:
                            greater -= 1
                        elif s == target:
                            ties -= 1
                hit, rr = expected_hit_rr(greater, ties - 1, K)
                out[e, 3], out[e, 4], out[e, 5] = 1.0, hit, rr
            clear_scores(acc, touched, n_touched[0])
        learn_event(u, x, t, keys[e], *learn_args)


@njit(cache=True, nogil=True)
def drop_neighbours(rows, weights, errors, gone):
    """Forget items (``gone[x]``, a mask over item rows): clear their own rows and take them out
    of every other row, whose remaining pairs keep their order, free slots last (``add_pair``
    fills left to right). One pass over the table, no temporary copies."""
    n = rows.shape[1]
    for y in range(rows.shape[0]):
        if y < len(gone) and gone[y]:
            for c in range(n):
                rows[y, c] = -1
                weights[y, c] = 0.0
                errors[y, c] = 0.0
            continue
        w = 0
        c = 0
        while c < n and rows[y, c] >= 0:
            x = rows[y, c]
            if not (x < len(gone) and gone[x]):
                if w != c:
                    rows[y, w] = x
                    weights[y, w] = weights[y, c]
                    errors[y, w] = errors[y, c]
                w += 1
            c += 1
        for d in range(w, c):
            rows[y, d] = -1
            weights[y, d] = 0.0
            errors[y, d] = 0.0


@njit(cache=True, nogil=True)
def drop_listed(lists, lengths, start, gone):
    """Forget items (``gone[x]``) from short lists: row ``r`` holds ``min(lengths[r], width)``
    entries from column ``start[r]`` on, circularly. A row that held one gets its other entries
    in columns ``0..`` in their order, zeros after, and their count as its length; the other rows
    are left exactly as they were."""
    width = lists.shape[1]
    buf = np.empty(width, dtype=lists.dtype)
    for r in range(lists.shape[0]):
        m = min(lengths[r], width)
        hit = False
        for p in range(m):
            x = lists[r, (start[r] + p) % width]
            if x < len(gone) and gone[x]:
                hit = True
                break
        if not hit:
            continue
        k = 0
        for p in range(m):
            x = lists[r, (start[r] + p) % width]
            if not (x < len(gone) and gone[x]):
                buf[k] = x
                k += 1
        for c in range(width):
            lists[r, c] = buf[c] if c < k else 0
        lengths[r] = k
