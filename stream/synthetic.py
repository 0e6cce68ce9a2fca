"""A synthetic clickstream with planted tastes, for the demo, the tests and the benchmarks.

Items have one or two genres and Zipf popularity; users have a few favourite
genres (a sparse Dirichlet taste) and lognormal activity (or Zipf activity with
``user_zipf_exponent``, as in the scale benchmark). An event picks a
user, a genre from the user's taste and a popular item of that genre (or,
with probability ``noise``, any popular item). Tastes drift: every
``drift_every`` events a fraction of users take new tastes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

GENRES = (
    "action", "comedy", "drama", "horror", "romance", "sci-fi",
    "thriller", "documentary", "animation", "fantasy", "crime", "music",
)
EVENT_TYPES = ("view", "click", "purchase")
EVENT_TYPE_P = (0.6, 0.3, 0.1)


@dataclass
class SyntheticEvents:
    users: np.ndarray  # int64 user numbers
    items: np.ndarray  # int64 item numbers
    event_types: np.ndarray  # int8 index into EVENT_TYPES
    ts: np.ndarray  # int64 epoch ms

    def __len__(self) -> int:
        return len(self.users)

    def user_ids(self) -> list[str]:
        return [f"u{u}" for u in self.users.tolist()]

    def item_ids(self) -> list[str]:
        return [f"i{i}" for i in self.items.tolist()]

    def messages(self) -> list[tuple[bytes, bytes]]:
        """(key, JSON value) per event in the input-event format."""
        dumps = orjson.dumps
        out = []
        for u, i, e, t in zip(self.users.tolist(), self.items.tolist(), self.event_types.tolist(), self.ts.tolist()):
            user = f"u{u}"
            value = dumps({"user_id": user, "item_id": f"i{i}", "event_type": EVENT_TYPES[e], "ts": t})
            # A copy: each bytes object orjson (3.13) returns keeps about 4 KB resident, so a list
            # of 2M of them took 8 GB (bench/scale.py); the copy takes its own ~100 bytes.
            out.append((user.encode(), bytes(memoryview(value))))
        return out


class SyntheticClickstream:
    """Generates events in batches; the same seed gives the same stream.

    >>> gen = SyntheticClickstream(n_users=100, n_items=50, seed=1)
    >>> ev = gen.events(1000)
    >>> len(ev), int(ev.items.max()) < 50, gen.genres_of(0)[0] in GENRES
    (1000, True, True)
    >>> zipf = SyntheticClickstream(n_users=1000, n_items=50, seed=1, user_zipf_exponent=1.0)
    >>> round(float(np.sort(zipf.activity)[-1] / zipf.activity.sum()), 3)  # the top user: 1 / H(1000)
    0.134
    """

    def __init__(
        self,
        n_users: int = 5000,
        n_items: int = 2000,
        seed: int = 0,
        taste_concentration: float = 0.15,
        noise: float = 0.1,
        zipf_exponent: float = 1.0,
        drift_every: int = 0,
        drift_fraction: float = 0.1,
        events_per_second: float = 1000.0,
        start_ms: int = 1_700_000_000_000,
        user_zipf_exponent: float | None = None,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.n_users, self.n_items = n_users, n_items
        self.noise = noise
        self.drift_every, self.drift_fraction = drift_every, drift_fraction
        self.taste_concentration = taste_concentration
        self.ms_per_event = 1000.0 / events_per_second
        self.start_ms = start_ms
        self.emitted = 0
        self.drifts = 0
        n_genres = len(GENRES)
        rng = self.rng
        primary = rng.integers(0, n_genres, n_items)
        secondary = np.where(rng.random(n_items) < 0.4, rng.integers(0, n_genres, n_items), primary)
        self.item_genres = np.stack([primary, secondary], axis=1)
        self.popularity = 1.0 / np.arange(1, n_items + 1) ** zipf_exponent
        rng.shuffle(self.popularity)
        self.popularity /= self.popularity.sum()
        self._genre_items = []
        for g in range(n_genres):
            members = np.flatnonzero((primary == g) | (secondary == g))
            weights = self.popularity[members]
            self._genre_items.append((members, weights / weights.sum()))
        if user_zipf_exponent is None:
            activity = rng.lognormal(0.0, 1.0, n_users)
        else:
            # Heavier-headed than the lognormal: a few users make a large share of the events,
            # as in a production clickstream. Shuffled so that activity is unrelated to the id.
            activity = 1.0 / np.arange(1, n_users + 1) ** user_zipf_exponent
            rng.shuffle(activity)
        self.activity = activity / activity.sum()
        self.tastes = self._draw_tastes(n_users)

    def _draw_tastes(self, n: int) -> np.ndarray:
        return self.rng.dirichlet(np.full(len(GENRES), self.taste_concentration), n)

    def genres_of(self, item: int) -> list[str]:
        return sorted({GENRES[g] for g in self.item_genres[item]})

    def shift_tastes(self, fraction: float) -> np.ndarray:
        """Give ``fraction`` of the users new tastes; returns who changed."""
        who = np.flatnonzero(self.rng.random(self.n_users) < fraction)
        self.tastes[who] = self._draw_tastes(len(who))
        self.drifts += 1
        return who

    def events(self, n: int) -> SyntheticEvents:
        parts = []
        while n > 0:
            step = n
            if self.drift_every:
                step = min(n, self.drift_every - self.emitted % self.drift_every)
            parts.append(self._events(step))
            n -= step
            if self.drift_every and self.emitted % self.drift_every == 0:
                self.shift_tastes(self.drift_fraction)
        if len(parts) == 1:
            return parts[0]
        return SyntheticEvents(*(np.concatenate([getattr(p, f) for p in parts])
                                 for f in ("users", "items", "event_types", "ts")))

    def _events(self, n: int) -> SyntheticEvents:
        rng = self.rng
        users = rng.choice(self.n_users, size=n, p=self.activity)
        cumulative = np.cumsum(self.tastes[users], axis=1)
        genres = (cumulative < rng.random(n)[:, None] * cumulative[:, -1:]).sum(axis=1)
        items = np.empty(n, dtype=np.int64)
        for g, (members, weights) in enumerate(self._genre_items):
            at = np.flatnonzero(genres == g)
            if len(at):
                items[at] = rng.choice(members, size=len(at), p=weights) if len(members) else 0
        noisy = np.flatnonzero(rng.random(n) < self.noise)
        items[noisy] = rng.choice(self.n_items, size=len(noisy), p=self.popularity)
        event_types = rng.choice(len(EVENT_TYPES), size=n, p=EVENT_TYPE_P).astype(np.int8)
        ts = self.start_ms + ((self.emitted + np.arange(n)) * self.ms_per_event).astype(np.int64)
        self.emitted += n
        return SyntheticEvents(users.astype(np.int64), items, event_types, ts)

    def favourite_items(self, user: int, k: int) -> np.ndarray:
        """The k items this user is most likely to pick now (the planted truth)."""
        p = self.noise * self.popularity
        for g, (members, weights) in enumerate(self._genre_items):
            p[members] += (1 - self.noise) * self.tastes[user, g] * weights
        return np.argsort(-p)[:k]
