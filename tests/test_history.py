"""The interaction history (compiled, flat arrays) against the plain definition: an ordered set per user."""

import numpy as np
import pytest
from recstream.embeddings.history import InteractionHistory


class _Reference:
    """The definition: per user a dict used as an ordered set, the oldest first-seen item evicted."""

    def __init__(self, limit):
        self.limit, self.items = limit, {}

    def add(self, users, items):
        for u, i in zip(users.tolist(), items.tolist()):
            recent = self.items.get(u)
            if recent is None:
                self.items[u] = {i: None}
            elif i not in recent:
                recent[i] = None
                if len(recent) > self.limit:
                    del recent[next(iter(recent))]

    def to_arrays(self):
        users = list(self.items)
        counts = [len(self.items[u]) for u in users]
        return {"users": np.array(users, dtype=np.int64), "ends": np.cumsum(counts, dtype=np.int64),
                "items": np.array([i for u in users for i in self.items[u]], dtype=np.int64)}


@pytest.mark.parametrize("limit", [1, 3, 50])
def test_history_equals_the_ordered_set_definition_through_batches_and_a_restore(limit):
    rng = np.random.default_rng(limit)
    history, reference = InteractionHistory(limit), _Reference(limit)
    for step in range(40):
        n = int(rng.integers(0, 3000))
        users = rng.zipf(1.5, n) % 700 + 5 * step  # heavy users past the limit, new users every batch
        items = rng.zipf(1.3, n) % 400
        history.add(users, items)
        reference.add(users, items)
        if step == 20:  # a checkpoint restore in the middle
            restored = InteractionHistory(limit)
            restored.load_arrays(history.to_arrays())
            history = restored
    expected = reference.to_arrays()
    got = history.to_arrays()
    for key in ("users", "ends", "items"):
        assert got[key].dtype == np.int64 and got[key].tolist() == expected[key].tolist()
    for u in [0, 3, 17, 250, 10_000]:
        assert history.items_of(u) == reference.items.get(u, {})
    asked = np.array([17, 10_000, 3, 17])
    at_user, at_item = history.pairs(asked)
    assert list(zip(at_user.tolist(), at_item.tolist())) == [
        (n, i) for n, u in enumerate(asked.tolist()) for i in reference.items.get(u, {})]


def test_a_batch_that_outgrows_the_pool_lists_each_user_once():
    history = InteractionHistory(500)
    users = np.arange(200_000)  # 200k new users in one batch: the pool (64k entries) grows mid-batch
    history.add(users, users % 7)
    arrays = history.to_arrays()
    assert len(arrays["users"]) == len(np.unique(arrays["users"])) == 200_000
    restored = InteractionHistory(500)
    restored.load_arrays(arrays)
    assert restored.items_of(123_456) == {123_456 % 7: None}
