"""Fixtures: a real Kafka-protocol broker, fresh topics per test, a service running in a thread.

Broker, in order of preference:
- ``KAFKA_BOOTSTRAP_SERVERS`` set: that cluster;
- otherwise the embedded tansu broker, and, where a Docker engine answers,
  also Apache Kafka (KRaft) in a container via testcontainers: every
  integration test runs once per broker.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import pytest
from confluent_kafka import Consumer, Producer

from recstream.stream.broker import EmbeddedBroker, create_topics
from recstream.stream.config import ServiceConfig, load_config
from recstream.stream.service import RecStreamService

# Fast group settings for tests only (see ../shared/BROKER-NOTES.md); never production defaults.
FAST_GROUP = {
    "session.timeout.ms": "2000",
    "heartbeat.interval.ms": "300",
    "max.poll.interval.ms": "10000",
}


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _broker_kinds() -> list[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return ["external"]
    return ["tansu", "kafka"] if _docker_available() else ["tansu"]


@pytest.fixture(scope="session", params=_broker_kinds())
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    kind = request.param
    if kind == "external":
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif kind == "kafka":
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:
            from testcontainers.kafka import KafkaContainer
        with KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
    else:
        with EmbeddedBroker() as bootstrap:
            yield bootstrap


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, for tests that stop or restart it."""
    broker = EmbeddedBroker()
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def topics(kafka_bootstrap: str) -> dict[str, str]:
    """Fresh topic names (the test broker's latest-offset answers are unreliable: never reuse a topic)."""
    tag = uuid.uuid4().hex[:10]
    names = {"input": f"clicks-{tag}", "output": f"recs-{tag}", "dlq": f"clicks-{tag}.dlq"}
    create_topics(kafka_bootstrap, {names["input"]: 3, names["output"]: 3, names["dlq"]: 1})
    return names


def service_config(bootstrap: str, topics: dict[str, str], **overrides: object) -> ServiceConfig:
    base = {
        "kafka.bootstrap.servers": bootstrap,
        **{f"kafka.{k}": v for k, v in FAST_GROUP.items()},
        "topics.input": topics["input"],
        "topics.output": topics["output"],
        "topics.dead_letter": topics["dlq"],
        "topics.group_id": f"g-{uuid.uuid4().hex[:10]}",
        "output.flush_interval_s": 0.3,
        "index.min_rebuild_interval_s": 0.5,
        "model.dim": 16,
    }
    base.update(overrides)
    return load_config(overrides=base)


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(30) == 0


def event(user: object, item: object, **fields: object) -> tuple[bytes, bytes]:
    return str(user).encode(), orjson.dumps({"user_id": user, "item_id": item, **fields})


def read_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 60.0) -> list:
    """Read ``topic`` from the start until ``expect`` messages came or the time is up."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"reader-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        **FAST_GROUP,
    })
    consumer.subscribe([topic])
    out = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                if m.error() is None:
                    out.append(m)
    finally:
        consumer.close()
    return out


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@contextmanager
def running(config: ServiceConfig) -> Iterator[RecStreamService]:
    """The service in a background thread; stopped (gracefully) and joined on exit."""
    stop = threading.Event()
    service = RecStreamService(config, stop=stop)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            service.run()
        except BaseException as exc:  # surfaced in the test below
            errors.append(exc)

    thread = threading.Thread(target=target, name="service-under-test")
    thread.start()
    try:
        yield service
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive(), "service did not stop within 60 s"
    if errors:
        raise errors[0]
