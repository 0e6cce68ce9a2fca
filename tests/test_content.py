"""Content features: parsing, the feature-to-vector regression, and refreshing only cold items."""

import numpy as np
from recstream.embeddings.content import ContentProjector, ItemContent, metadata_features, refresh_cold_items
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.stream.checkpoint import CheckpointStore
from recstream.stream.state import RecState


def test_features_from_lists_joined_strings_and_text():
    names = metadata_features({"genres": ["Horror", "Comedy"], "tags": "Dark|  |Scary"}, "The Thing")
    assert names[:4] == ["genres=Horror", "genres=Comedy", "tags=dark", "tags=scary"]
    assert len([n for n in names if n.startswith("text#")]) == 2  # "the", "thing"
    assert metadata_features(None) == []


def test_cold_items_get_the_vector_their_features_predict():
    rng = np.random.default_rng(0)
    model = OnlineMF(MFConfig(dim=4, seed=1))
    content = ItemContent()
    genre_vectors = rng.normal(size=(3, 4)).astype(np.float32)
    warm = [f"warm{n}" for n in range(60)]
    rows = model.items.rows(warm + ["cold-new", "cold-seen"])
    for n, row in enumerate(rows[:60].tolist()):
        content.set(row, [f"genre={n % 3}"])
    content.set(int(rows[60]), ["genre=1"])
    content.set(int(rows[61]), ["genre=2"])
    # Warm items: plenty of events, vectors that follow their genre exactly.
    model.learn(["u"] * 600, [w for w in warm for _ in range(10)])
    Q, _ = model.items.storage
    for n, row in enumerate(rows[:60].tolist()):
        Q[row] = genre_vectors[n % 3]
    model.learn(["v"] * 2, ["cold-seen", "cold-seen"])  # two events: still cold (< 5)
    before_warm = model.items.vectors[rows[:60]].copy()
    version = model.model_version

    refreshed = refresh_cold_items(model, content, ContentProjector(regularization=0.01), min_count=5)

    assert refreshed == 2
    np.testing.assert_array_equal(model.items.vectors[rows[:60]], before_warm)  # warm items untouched
    np.testing.assert_allclose(model.items.vectors[rows[60]], genre_vectors[1], atol=0.01)
    np.testing.assert_allclose(model.items.vectors[rows[61]], genre_vectors[2], atol=0.01)
    assert set(model.items_changed_since(version).tolist()) == {int(rows[60]), int(rows[61])}


def test_item_metadata_survives_a_checkpoint(tmp_path):
    state = RecState(MFConfig(dim=4))
    state.set_item_metadata(["a", "b"], [{"genres": ["X"]}, None], [None, "some words"])
    store = CheckpointStore(tmp_path)
    state.save(store)
    restored = RecState.restore(store.load_latest(), MFConfig(dim=4))
    assert restored.content.features.ids == state.content.features.ids
    for row in (0, 1):
        np.testing.assert_array_equal(restored.content.matrix(np.array([row]))[1],
                                      state.content.matrix(np.array([row]))[1])


def test_a_new_item_is_recommended_to_the_users_who_like_its_genres():
    from recstream.index.query import Recommender
    from recstream.stream.config import EventsConfig
    from recstream.stream.events import EventDecoder
    from recstream.stream.synthetic import GENRES, SyntheticClickstream

    gen = SyntheticClickstream(n_users=800, n_items=300, seed=8, noise=0.02)
    state = RecState(MFConfig(dim=16))
    decoder = EventDecoder(EventsConfig())
    messages = gen.events(120_000).messages()
    for start in range(0, len(messages), 5000):
        state.apply(decoder.decode([v for _, v in messages[start:start + 5000]])[0])
    state.set_item_metadata([f"i{i}" for i in range(gen.n_items)],
                            [{"genres": gen.genres_of(i)} for i in range(gen.n_items)], [None] * gen.n_items)
    horror = GENRES.index("horror")
    state.set_item_metadata(["new-horror"], [{"genres": ["horror"]}], [None])
    assert state.refresh_cold_items() >= 1
    new_row = state.model.items.ids.get("new-horror")

    fans = [u for u in range(gen.n_users) if gen.tastes[u, horror] > 0.6]
    others = [u for u in range(gen.n_users) if gen.tastes[u, horror] < 0.01]
    rows = lambda users: np.array([state.model.users.ids.get(f"u{u}") for u in users
                                   if state.model.users.ids.get(f"u{u}") is not None])
    recommender = Recommender(state.model, state.history, k=20)
    share = lambda users: np.mean([new_row in r.item_rows for r in recommender.recommend(rows(users), None)])
    fans_share, others_share = share(fans), share(others)
    print(f"new horror item in the top 20 of {fans_share:.0%} of horror fans, {others_share:.0%} of others")
    assert fans_share > 0.2 and others_share < 0.05


def test_metadata_topic_feeds_cold_items_in_the_service(kafka_bootstrap, topics):
    import orjson
    from conftest import event, produce, read_all, running, service_config, wait_for
    from recstream.stream.broker import create_topics
    from recstream.stream.service import DLQ_REASON_HEADER

    metadata_topic = topics["input"] + "-items"
    create_topics(kafka_bootstrap, {metadata_topic: 1})
    # Two groups of users with different tastes: u0-u19 click genre g0 items, u20-u39 genre g1 items.
    events = [event(f"u{n % 20 + 20 * (n % 2)}", f"i{3 * ((n // 2) % 10) + n % 2}") for n in range(3000)]
    produce(kafka_bootstrap, topics["input"], events)
    items = [(f"i{n}".encode(), orjson.dumps({"item_id": f"i{n}", "features": {"genres": [f"g{n % 3}"]}}))
             for n in range(30)]
    items += [(b"new", orjson.dumps({"item_id": "brand-new", "features": {"genres": ["g1"]}, "text": "a new one"})),
              (b"bad", b'{"item_id": "", "features": 3}')]
    produce(kafka_bootstrap, metadata_topic, items)
    config = service_config(kafka_bootstrap, topics, **{"topics.item_metadata": metadata_topic,
                                                        "content.refresh_interval_s": 0.2})
    with running(config) as service:
        wait_for(lambda: service.stats.events_applied == 3000 and service.stats.item_metadata == 31
                 and service.stats.cold_items_refreshed > 0, what="events, metadata and a content refresh")
        with service.model_lock:
            model = service.model
            row = model.items.ids.get("brand-new")
            assert row is not None and model.interaction_counts(np.array([row]))[0] == 0
            # Its vector is what its genre predicts: the g1 items', not the g0 items'.
            genre_mean = {g: model.items.vectors[[model.items.ids.get(f"i{n}") for n in range(g, 30, 3)]].mean(0)
                          for g in (0, 1)}
            cosine = {g: float(v @ model.items.vectors[row] / np.linalg.norm(v) / np.linalg.norm(model.items.vectors[row]))
                      for g, v in genre_mean.items()}
            assert cosine[1] > 0.95 and cosine[1] > cosine[0] + 0.1, cosine
    letters = read_all(kafka_bootstrap, topics["dlq"], expect=1)
    assert b"bad item metadata" in dict(letters[0].headers())[DLQ_REASON_HEADER]
