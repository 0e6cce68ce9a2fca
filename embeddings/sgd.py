"""Compiled kernels: one call applies a whole batch of events, in order.

Everything random here comes from a counter-based generator (splitmix64)
whose whole state is one uint64, so a run is reproducible from the event
order and the seed alone, and the state fits in a checkpoint.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@njit(cache=True, inline="always")
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def _next_u64(state):
    state[0] += _GOLDEN
    return _mix64(state[0])


@njit(cache=True, inline="always")
def _unit(z):
    return (z >> np.uint64(11)) * _TO_UNIT


@njit(cache=True, nogil=True)
def init_rows(out, id_hashes, seed, std):
    """Fill ``out[r]`` with N(0, std^2) values derived from ``(seed, id_hashes[r])``.

    The initial vector of an id depends on nothing but the id and the seed, so
    it is the same whatever order ids arrive in and in every process.
    """
    dim = out.shape[1]
    state = np.empty(1, dtype=np.uint64)  # reset for each row: one allocation, not one per row
    for r in range(out.shape[0]):
        state[0] = _mix64(id_hashes[r] ^ _mix64(seed))
        f = 0
        while f < dim:
            u1 = _unit(_next_u64(state))
            u2 = _unit(_next_u64(state))
            if u1 <= 1e-300:
                continue
            radius = np.sqrt(-2.0 * np.log(u1)) * std
            out[r, f] = radius * np.cos(2.0 * np.pi * u2)
            if f + 1 < dim:
                out[r, f + 1] = radius * np.sin(2.0 * np.pi * u2)
            f += 2


# Bounds that keep every learned value finite for any accepted input, whatever the rating scale:
# rating errors (in rating units, see MFConfig.rating_unit) are clipped before they become
# gradients, and every learned value (vector components, biases, scales) is clipped after its
# step. A box on components rather than a ball on rows: an elementwise clip keeps the loops
# vectorisable, a row norm is a reduction that stops LLVM from vectorising them. The bounds are
# far above what learning reaches on the usual scales (MovieLens: |err| < 5, components < 2,
# biases < 3), so there they never bind and results are bit-identical; on a scale the step sizes
# do not suit (0-100 without a rating unit) they keep the state finite instead of letting it
# overflow to inf and NaN.
MAX_ERROR = 50.0
MAX_COMPONENT = 30.0
MAX_SCALAR = 100.0


@njit(cache=True, inline="always")
def _clip(x, bound):
    return min(max(x, -bound), bound)


@njit(cache=True, inline="always")
def _sigmoid(x):
    if x >= 0:
        return 1.0 / (1.0 + np.exp(-x))
    e = np.exp(x)
    return e / (1.0 + e)


@njit(cache=True, inline="always")
def item_popularity(events):
    """An item's popularity term in a rating, ``log1p(events) - 2``: centred near a typical item's log count."""
    return np.log1p(events) - 2.0


@njit(cache=True, inline="always")
def _rating(mu, b_user, taste, scale, item_part):
    """The rating estimate ``mu + b_u + taste + s_u * (b_i + p.q)``: one formula for learning and replay."""
    return mu + b_user + taste + scale * item_part


@njit(cache=True, inline="always")
def _item_rate(lr, lr_new, events, new_events):
    """An item's step size: ``lr_new`` while it is new, falling to ``lr`` as its events pass ``new_events``."""
    return max(lr, lr_new / np.sqrt(1.0 + events / new_events))


@njit(cache=True, inline="always")
def _bias_rate(lr_bias, events, prior_events, scale):
    """A rating bias's step size: a running mean's ``1/n`` (shrunk by ``prior_events``) until it
    reaches ``lr_bias``; ``scale`` is the pass's decay (``lr_bias`` comes scaled already)."""
    return max(lr_bias, scale / (events + prior_events))


@njit(cache=True, inline="always")
def _step(P, Q, bu, bi, u, j, g, lr, lr_item, lr_bu, lr_bi, reg):
    """One SGD step moving the score of (u, j) along ``g`` (the loss gradient, sign flipped)."""
    dim = P.shape[1]
    for f in range(dim):
        pu = P[u, f]
        qj = Q[j, f]
        P[u, f] = _clip(pu + lr * (g * qj - reg * pu), MAX_COMPONENT)
        Q[j, f] = _clip(qj + lr_item * (g * pu - reg * qj), MAX_COMPONENT)
    bi[j] = _clip(bi[j] + lr_bi * (g - reg * bi[j]), MAX_SCALAR)
    bu[u] = _clip(bu[u] + lr_bu * (g - reg * bu[u]), MAX_SCALAR)


@njit(cache=True, inline="always")
def _step_seq(P, Q, F, bi, u, prev, phi, j, g, lr, lr_seq, lr_item, reg):
    """SGD step on ``b_j + (p_u + phi * f_prev) . q_j``, f_prev the previous item's transition vector."""
    dim = P.shape[1]
    for f in range(dim):
        pu = P[u, f]
        fp = F[prev, f]
        qj = Q[j, f]
        P[u, f] = _clip(pu + lr * (g * qj - reg * pu), MAX_COMPONENT)
        F[prev, f] = _clip(fp + lr_seq * (g * phi * qj - reg * fp), MAX_COMPONENT)
        Q[j, f] = _clip(qj + lr_item * (g * (pu + phi * fp) - reg * qj), MAX_COMPONENT)
    bi[j] = _clip(bi[j] + lr_item * (g - reg * bi[j]), MAX_SCALAR)


@njit(cache=True, inline="always")
def _replay_ratings(P, Q, bu, bi, scale, pop_taste, item_events, item_seq, seq, mu, u, i, r,
                    ring_users, ring_items, ring_ratings, ring_state, steps, rng_state, lr, reg):
    """Add rating (u, i, r) to the ring of recent ratings, then step the item vectors of
    ``steps`` ratings drawn from it (see ``sgd_batch``)."""
    cap = ring_users.shape[0]
    if cap == 0 or steps == 0:
        return
    pos = ring_state[0]
    ring_users[pos] = u
    ring_items[pos] = i
    ring_ratings[pos] = r
    ring_state[0] = (pos + 1) % cap
    if ring_state[1] < cap:
        ring_state[1] += 1
    filled = ring_state[1]
    dim = P.shape[1]
    for _ in range(steps):
        # Drawn over the whole capacity, a rating is replayed ``steps`` times on average over its
        # stay in the ring, also while the ring fills (drawn over the filled part, the first
        # ratings after a start would be replayed about 9 times as often).
        k = np.int64(_next_u64(rng_state) % np.uint64(cap))
        if k >= filled:
            continue
        v = ring_users[k]
        j = ring_items[k]
        dot = 0.0
        for f in range(dim):
            dot += P[v, f] * Q[j, f]
        taste = pop_taste[v] * item_popularity(item_events[j])
        g = _clip(ring_ratings[k] - _rating(mu, bu[v], taste, scale[v], bi[j] + dot), MAX_ERROR) * scale[v]
        for f in range(dim):
            Q[j, f] = _clip(Q[j, f] + lr * (g * P[v, f] - reg * Q[j, f]), MAX_COMPONENT)
        item_seq[j] = seq


# Slots of the running means (``Shared.means``): every event reads them, checkpoints keep them.
MEAN_RATING = 0  # running mean of all ratings (mu)
RATINGS_SEEN = 1
MEAN_WEIGHT = 2  # running mean of the positive implicit weights
WEIGHTS_SEEN = 3


class UserArrays(NamedTuple):
    """What the kernel learns per user (row ``u`` of each array)."""

    vectors: np.ndarray  # p_u, (n, dim) float32
    biases: np.ndarray  # b_u, float32
    events: np.ndarray  # events of any kind, int64
    short: np.ndarray  # short-term interest vector, (n, dim) float32
    short_ts: np.ndarray  # event time of the short-term vector, int64 (0: none yet)
    last_item: np.ndarray  # previous implicit item, int64 (-1: none)
    scale: np.ndarray  # s_u, how widely the user uses the rating scale, float32
    pop_taste: np.ndarray  # t_u, rating shift per centred log item count, float32


class ItemArrays(NamedTuple):
    """What the kernel learns per item (row ``i`` of each array)."""

    vectors: np.ndarray  # q_i, (n, dim) float32
    biases: np.ndarray  # b_i, float32
    changed: np.ndarray  # model version of the item's last change, int64
    events: np.ndarray  # events of any kind, int64
    transitions: np.ndarray  # F_i, where users go after item i, (n, dim) float32
    pool_count: np.ndarray  # the item's entries in the ring of recent positives, int64


class Shared(NamedTuple):
    """State every event may touch: running means, the random generator and the two rings."""

    means: np.ndarray  # float64 [MEAN_RATING, RATINGS_SEEN, MEAN_WEIGHT, WEIGHTS_SEEN]
    rng: np.ndarray  # splitmix64 state, one uint64
    positives: np.ndarray  # ring of recent implicit positives (item rows): where negatives come from
    positives_state: np.ndarray  # [next write position, number filled]
    replay_users: np.ndarray  # ring of recent ratings: users, items, ratings
    replay_items: np.ndarray
    replay_ratings: np.ndarray
    replay_state: np.ndarray  # [next write position, number filled]


class StepSizes(NamedTuple):
    """Rates and regularisation of one call (already times the pass's ``rate_scale``)."""

    lr: np.float32  # users and well-known items
    lr_new: np.float32  # an item with few events, falling as they pass new_events
    new_events: np.float32
    lr_seq: np.float32  # transition vectors
    lr_bias: np.float32  # floor of a rating bias's running-mean step
    bias_prior: np.float32  # prior events of a rating bias's running mean
    rate_scale: np.float32  # the pass's decay
    reg: np.float32
    lr_scale: np.float32  # rating scale s_u, pulled toward 1 by scale_reg
    scale_reg: np.float32
    lr_taste: np.float32  # popularity taste t_u, pulled toward 0 by taste_reg
    taste_reg: np.float32
    lr_replay: np.float32  # replayed ratings' item steps, L2 replay_reg
    replay_reg: np.float32
    short_keep: float  # short-term vector: share kept per event
    short_half_life_ms: float  # its fade (and the sequence's) per event time
    n_negatives: int
    replay_steps: int


@njit(cache=True, nogil=True)
def sgd_batch(U, I, S, rates, users, items, ratings, weights, timestamps, seq, predictions):
    """Apply events ``0..n-1`` (``users``, ``items``, ``ratings``, ``weights``, ``timestamps``) in
    order to the user state ``U``, the item state ``I`` and the shared state ``S``, with step sizes
    ``rates``; returns the summed loss of the batch. ``predictions[e]`` receives the model's output
    for event ``e`` *before* learning from it (the rating estimate, or the implicit score):
    prequential evaluation reads it. Every item whose row moved gets ``I.changed[i] = seq``;
    ``I.events`` and ``U.events`` count the events of any kind on each id.

    Explicit event (``ratings[e]`` is a number): squared loss on
    ``mu + b_u + t_u * pop_i + s_u * (b_i + p_u . q_i)``, ``mu`` (``S.means[MEAN_RATING]``) the
    running mean of all ratings. A bias is a mean of residuals: it steps by
    ``1 / (events + bias_prior)`` until that falls to ``lr_bias``, so a new user's or item's bias
    settles in a few ratings and an old one still follows drift. Users also use the rating scale
    differently (some spread 1-5, some stay within 3-4): ``s_u`` is learned by ``lr_scale`` and
    pulled toward 1 by ``scale_reg``. And some rate well-known items higher than obscure ones,
    some the other way: ``t_u`` times the item's centred log event count ``pop_i`` joins the
    rating (learned by ``lr_taste``, pulled toward 0 by ``taste_reg``). One pass over a stream
    leaves item vectors under-trained (most items have a handful of ratings, each seen once), so
    every rating also joins a ring of recent ratings (``S.replay_*``), and ``replay_steps``
    ratings drawn from it step their item's vector again, by ``lr_replay`` with L2
    ``replay_reg``, against today's user vectors, biases and scale. Only item vectors move in a
    replay (biases replayed as well overfit; users outside the batch keep their vectors), and
    replayed items count as changed.

    Implicit event (``ratings[e]`` is NaN): logistic loss, the item as a
    positive with confidence ``weights[e]`` (relative to the running mean of implicit weights,
    ``S.means[MEAN_WEIGHT]``) and ``n_negatives`` negatives drawn from the ring of recent
    positives (``S.positives``), i.e. in proportion to recent popularity. Drawing negatives from
    recently active items (not uniformly) keeps the set of items an update moves small. Negatives
    drawn in proportion to recent popularity make the score learn ``log P(i|u) - log
    P_recent(i)`` (a PMI, as in word2vec), so ranking adds that popularity back:
    ``I.pool_count[i]`` counts item i's entries in the ring (see ``OnlineMF.ranking_biases``); an
    item pushed out of the ring counts as changed.

    Step sizes: users and well-known items step by ``lr``; an item with few events steps by up to
    ``lr_new``, falling as its count passes ``new_events`` (most items of a catalogue have few
    events, and a slow rate leaves them near their random start; popular items need the small
    one). Transition vectors step by ``lr_seq``: "what comes after this item" is a fast-moving
    signal, but where clicks have no order a high rate only shakes the item vectors.

    Short-term interest: after an implicit event, ``U.short[u]`` moves toward the item's vector
    (``short <- keep * fade * short + (1 - keep) * q_i``), where ``fade`` halves every
    ``short_half_life_ms`` of event time since the user's previous event (``U.short_ts[u]``); a
    burst of clicks pulls it along, a pause lets it fade back to nothing.
    ``OnlineMF.query_vectors`` adds it to the long-term vector when ranking. Events without a
    time (ts 0) leave it alone.

    Sequence (FPMC-style): each item also has a transition vector ``I.transitions[i]``; an
    implicit event scores ``b_j + (p_u + phi * F[prev]) . q_j`` with ``prev`` the user's previous
    item (``U.last_item[u]``) and ``phi`` the same fade.
    """
    # The named state unpacked into locals: the loop below reads them at every event, and
    # attribute reads inside it (or the two paths as inlined functions) ran 10-30% slower.
    P, bu, user_events, short, short_ts, last_item, scale, pop_taste = (
        U.vectors, U.biases, U.events, U.short, U.short_ts, U.last_item, U.scale, U.pop_taste)
    Q, bi, item_seq, item_events, F, pool_count = (
        I.vectors, I.biases, I.changed, I.events, I.transitions, I.pool_count)
    mean_state, rng_state, recent_items, recent_state = S.means, S.rng, S.positives, S.positives_state
    replay_users, replay_items, replay_ratings, replay_state = (
        S.replay_users, S.replay_items, S.replay_ratings, S.replay_state)
    lr, lr_new, new_events, lr_seq, lr_bias, bias_prior, rate_scale, reg = (
        rates.lr, rates.lr_new, rates.new_events, rates.lr_seq, rates.lr_bias, rates.bias_prior, rates.rate_scale,
        rates.reg)
    lr_scale, scale_reg, lr_taste, taste_reg, lr_replay, replay_reg = (
        rates.lr_scale, rates.scale_reg, rates.lr_taste, rates.taste_reg, rates.lr_replay, rates.replay_reg)
    short_keep, short_half_life_ms, n_negatives, replay_steps = (
        rates.short_keep, rates.short_half_life_ms, rates.n_negatives, rates.replay_steps)
    dim = P.shape[1]
    cap = recent_items.shape[0]
    loss = 0.0
    for e in range(users.shape[0]):
        u = users[e]
        i = items[e]
        r = ratings[e]
        item_seq[i] = seq
        # Rates go by the events before this one.
        lr_i = _item_rate(lr, lr_new, item_events[i], new_events)
        events_i = item_events[i]
        events_u = user_events[u]
        item_events[i] += 1
        user_events[u] += 1
        dot = 0.0
        for f in range(dim):
            dot += P[u, f] * Q[i, f]
        if not np.isnan(r):
            s = scale[u]
            item_part = bi[i] + dot
            popularity = item_popularity(events_i)
            taste = pop_taste[u] * popularity
            predictions[e] = _rating(mean_state[MEAN_RATING], bu[u], taste, s, item_part)
            mean_state[RATINGS_SEEN] += 1.0
            mean_state[MEAN_RATING] += (r - mean_state[MEAN_RATING]) / mean_state[RATINGS_SEEN]
            err = r - _rating(mean_state[MEAN_RATING], bu[u], taste, s, item_part)
            loss += err * err
            err = _clip(err, MAX_ERROR)
            pop_taste[u] = _clip(pop_taste[u] + lr_taste * (err * popularity - taste_reg * pop_taste[u]), MAX_SCALAR)
            # The item part reaches the rating through the user's scale: its gradient carries s.
            _step(P, Q, bu, bi, u, i, err * s, lr, lr_i, 0.0, _bias_rate(lr_bias, events_i, bias_prior, rate_scale), reg)
            bu[u] = _clip(bu[u] + _bias_rate(lr_bias, events_u, bias_prior, rate_scale) * (err - reg * bu[u]),
                          MAX_SCALAR)
            scale[u] = _clip(s + lr_scale * (err * item_part - scale_reg * (s - 1.0)), MAX_SCALAR)
            _replay_ratings(P, Q, bu, bi, scale, pop_taste, item_events, item_seq, seq, mean_state[MEAN_RATING], u, i, r,
                            replay_users, replay_items, replay_ratings, replay_state, replay_steps, rng_state,
                            lr_replay, replay_reg)
            continue
        # Weights are relative confidences: dividing by their running mean keeps the average
        # step at the learning rate whatever their scale (log play counts reach 10 and more).
        # (Non-positive weights teach nothing and stay out of the mean; one event never steps more
        # than 10 times the average, whatever came before it.)
        raw = weights[e]
        if raw > 0:
            mean_state[WEIGHTS_SEEN] += 1.0
            mean_state[MEAN_WEIGHT] += (raw - mean_state[MEAN_WEIGHT]) / mean_state[WEIGHTS_SEEN]
        w = min(raw / mean_state[MEAN_WEIGHT], 10.0) if raw > 0 else 0.0
        # Sequence: the previous item's transition vector joins the user's, faded by the time
        # since that event. Events without a time (ts 0: shuffled logs) carry no sequence.
        elapsed = max(timestamps[e] - short_ts[u], 0)
        fade = 2.0 ** (-elapsed / short_half_life_ms) if short_half_life_ms > 0 else 1.0
        prev = last_item[u]
        phi = fade if prev >= 0 and timestamps[e] > 0 and short_ts[u] > 0 else 0.0
        if phi > 0:
            for f in range(dim):
                dot += phi * F[prev, f] * Q[i, f]
        x = bi[i] + dot
        predictions[e] = x
        loss += w * np.log1p(np.exp(-x)) if x > -30.0 else w * -x
        if phi > 0:
            _step_seq(P, Q, F, bi, u, prev, phi, i, w * (1.0 - _sigmoid(x)), lr, lr_seq, lr_i, reg)
            # The previous item's transition vector moves here (and with each negative below): it
            # counts as changed, for the group sync, the index and the finiteness check.
            item_seq[prev] = seq
        else:
            _step(P, Q, bu, bi, u, i, w * (1.0 - _sigmoid(x)), lr, lr_i, 0.0, lr_i, reg)
        if timestamps[e] > 0:  # a session is a span of time: events without one carry none
            for f in range(dim):
                short[u, f] = short_keep * fade * short[u, f] + (1.0 - short_keep) * Q[i, f]
            short_ts[u] = timestamps[e]
            last_item[u] = i
        filled = recent_state[1]
        for _ in range(n_negatives if filled > 0 else 0):
            j = recent_items[np.int64(_next_u64(rng_state) % np.uint64(filled))]
            if j == i:
                continue
            xj = bi[j]
            for f in range(dim):
                xj += P[u, f] * Q[j, f]
            lr_j = _item_rate(lr, lr_new, item_events[j], new_events)
            if phi > 0:
                for f in range(dim):
                    xj += phi * F[prev, f] * Q[j, f]
                _step_seq(P, Q, F, bi, u, prev, phi, j, -_sigmoid(xj), lr, lr_seq, lr_j, reg)
            else:
                _step(P, Q, bu, bi, u, j, -_sigmoid(xj), lr, lr_j, 0.0, lr_j, reg)
            item_seq[j] = seq
        pos = recent_state[0]
        if filled == cap:
            old = recent_items[pos]
            pool_count[old] -= 1
            item_seq[old] = seq
        pool_count[i] += 1
        recent_items[pos] = i
        recent_state[0] = (pos + 1) % cap
        if filled < cap:
            recent_state[1] = filled + 1
    return loss




@njit(cache=True, nogil=True)
def rows_finite(bits, rows):
    """Whether every value of ``M[rows]`` is finite, given ``bits = M.view(np.uint32)`` (``M`` a
    2-D float32 array), without copying the rows: the finiteness guard runs on every batch. A
    float32 is NaN or inf exactly when its exponent bits are all set; an integer test keeps the
    loop vectorisable where a float one (``x * 0 != 0``) is a serial chain."""
    bad = np.uint32(0)
    for r in rows:
        for f in range(bits.shape[1]):
            bad |= np.uint32((bits[r, f] & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
    return bad == 0
