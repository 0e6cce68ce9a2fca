"""Drift signals on a synthetic stream with a planted change of tastes."""

import logging

from recstream.embeddings.drift import LossDriftDetector
from recstream.embeddings.model import MFConfig
from recstream.stream.broker import create_topics
from recstream.stream.config import EventsConfig
from recstream.stream.events import EventDecoder
from recstream.stream.state import RecState
from recstream.stream.synthetic import SyntheticClickstream

from conftest import produce, running, service_config, wait_for


def _stream(n_before=150_000, n_after=60_000):
    gen = SyntheticClickstream(n_users=1500, n_items=800, seed=2, noise=0.02)
    before = gen.events(n_before).messages()
    gen.shift_tastes(1.0)  # every user's tastes change at once
    return before, gen.events(n_after).messages()


def test_loss_drift_is_flagged_after_a_change_of_tastes_and_not_before():
    before, after = _stream()
    state, decoder, detector = RecState(MFConfig(dim=16)), EventDecoder(EventsConfig()), LossDriftDetector()
    flagged = []
    for n, start in enumerate(range(0, len(before) + len(after), 2000)):
        chunk = (before + after)[start:start + 2000]
        _, _, losses = state.apply(decoder.decode([v for _, v in chunk])[0])
        if detector.update(losses):
            flagged.append(start)
    switch = len(before)
    assert not [s for s in flagged if 30_000 <= s < switch], flagged  # after warm-up, before the change
    assert [s for s in flagged if switch <= s < switch + 30_000], flagged  # soon after it


def test_service_logs_retrain_recommended(kafka_bootstrap, topics, caplog):
    before, after = _stream(100_000, 40_000)
    # One partition: the events reach the model in the order produced, so what ADWIN sees does not
    # depend on how the consumer interleaves partitions (with three it sometimes missed the rise).
    topics = {**topics, "input": topics["input"] + "-one"}
    create_topics(kafka_bootstrap, {topics["input"]: 1})
    produce(kafka_bootstrap, topics["input"], before + after)
    config = service_config(kafka_bootstrap, topics, **{"loop.batch_size": 2000, "output.publish": False})
    with caplog.at_level(logging.WARNING), running(config) as service:
        wait_for(lambda: service.stats.events_applied == len(before) + len(after), timeout_s=120,
                 what="all events")
    assert service.stats.loss_drifts >= 1
    assert "retrain/reindex recommended" in caplog.text
    assert 0 < service.stats.loss_mean < 5
