"""Learning: on a stream with planted tastes the model must beat popularity by far."""

import numpy as np
from recstream.embeddings.history import InteractionHistory
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.index.query import Recommender
from recstream.stream.synthetic import EVENT_TYPES, SyntheticClickstream

WEIGHTS = {"view": 0.5, "click": 1.0, "purchase": 3.0}


def test_recall_at_10_far_above_popularity():
    gen = SyntheticClickstream(n_users=2000, n_items=1000, seed=3)
    train, test = gen.events(200_000), gen.events(20_000)
    mf = OnlineMF(MFConfig(dim=32))
    history = InteractionHistory()
    weights = np.array([WEIGHTS[t] for t in EVENT_TYPES], dtype=np.float32)[train.event_types]
    users, items = mf.users.rows(train.user_ids()), mf.items.rows(train.item_ids())
    for start in range(0, len(users), 5000):
        part = slice(start, start + 5000)
        mf.learn_rows(users[part], items[part], np.full(len(users[part]), np.nan, np.float32), weights[part])
    history.add(users, items)

    future: dict[int, set[int]] = {}
    for u, i in zip(test.user_ids(), test.item_ids()):
        ru, ri = mf.users.ids.get(u), mf.items.ids.get(i)
        if ru is not None and ri is not None and ri not in history.items_of(ru):
            future.setdefault(ru, set()).add(ri)
    rows = np.array(sorted(future))
    popular = np.argsort(-np.bincount(items, minlength=len(mf.items)), kind="stable")
    model_recall, popular_recall = [], []
    top = Recommender(mf, history, k=10).recommend(rows, None)
    for n, user in enumerate(top.user_rows.tolist()):
        truth, seen = future[user], history.items_of(user)
        top_popular = [i for i in popular[:1000].tolist() if i not in seen][:10]
        model_recall.append(len(truth & set(top.of(n)[0].tolist())) / min(10, len(truth)))
        popular_recall.append(len(truth & set(top_popular)) / min(10, len(truth)))
    model, popularity = np.mean(model_recall), np.mean(popular_recall)
    print(f"recall@10 model {model:.3f} popularity {popularity:.3f}")
    assert model >= 1.25 * popularity, (model, popularity)
