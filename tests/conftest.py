"""Fixtures: a real Kafka-protocol broker, fresh topics per test, a service running in a thread.

Broker, in order of preference:
- ``KAFKA_BOOTSTRAP_SERVERS`` set: that cluster;
- otherwise the embedded tansu broker, and, where a Docker engine answers,
  also Apache Kafka (KRaft) in a container via testcontainers: every
  integration test runs once per broker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from recstream.stream.broker import EmbeddedBroker, create_topics, produce_all
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
def restartable_broker(tmp_path) -> Iterator[EmbeddedBroker]:
    """A broker of this test's own whose storage survives restarts, for tests that stop it.

    tansu keeps topics, records and committed offsets in S3; a local S3 emulator (moto) stands
    in for S3, so a restart behaves like a Kafka broker restart.
    """
    import boto3
    from recstream.stream.broker import free_port

    s3_port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(s3_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(s3_port), timeout_s=30, what="the S3 emulator")
        credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket="tansu")
        broker = EmbeddedBroker(storage_engine="s3://tansu/", log_path=tmp_path / "tansu.log", env={
            **credentials, "AWS_ENDPOINT": f"http://127.0.0.1:{s3_port}", "AWS_ALLOW_HTTP": "true"})
        broker.start()
        yield broker
        broker.stop()
    finally:
        moto.kill()
        moto.wait()


class KafkaProxy:
    """tansu's Kafka-protocol proxy in front of a broker: stopping it cuts one client's path only."""

    def __init__(self, origin: str) -> None:
        from recstream.stream.broker import free_port, tansu_binary

        self.origin, self.port, self.binary = origin, free_port(), tansu_binary()
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://{self.bootstrap_servers}"
        self.process = subprocess.Popen([str(self.binary), "proxy", "--listener-url", url,
                                         "--advertised-listener-url", url, "--origin-url", f"tcp://{self.origin}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _listening(self.port), timeout_s=20, what="the proxy to listen")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture
def kafka_proxy(kafka_bootstrap: str) -> Iterator[KafkaProxy]:
    proxy = KafkaProxy(kafka_bootstrap)
    proxy.start()
    yield proxy
    proxy.stop()


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
    assert produce_all(bootstrap, topic, messages, flush_timeout_s=30) == 0


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


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition (-1001 where none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, **FAST_GROUP})
    try:
        return {tp.partition: tp.offset for tp in
                consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)}
    finally:
        consumer.close()


def cli_run_args(bootstrap: str, topics: dict[str, str], group: str, *extra: str) -> list[str]:
    """``recstream run`` as a user would start it, with the fast group settings of the tests."""
    args = [sys.executable, "-m", "recstream.stream.cli", "run", "--bootstrap-servers", bootstrap,
            "--input-topic", topics["input"], "--output-topic", topics["output"], "--dlq-topic", topics["dlq"],
            "--group-id", group, *extra]
    for key, value in FAST_GROUP.items():
        args += ["-X", f"{key}={value}"]
    return args


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
    service = RecStreamService(config, stop=threading.Event())
    with service_thread(service) as thread:
        thread.start()
        yield service


@contextmanager
def service_thread(service: RecStreamService) -> Iterator[threading.Thread]:
    """A thread (not started) that runs ``service``; on exit the service is stopped, the thread
    joined, and an exception the service raised is raised here."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            service.run()
        except BaseException as exc:  # surfaced in the test below
            errors.append(exc)

    thread = threading.Thread(target=target, name="service-under-test")
    try:
        yield thread
    finally:
        service.stop.set()
        if thread.is_alive():
            thread.join(timeout=60)
        assert not thread.is_alive(), "service did not stop within 60 s"
    if errors:
        raise errors[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the broker is marked ``kafka``, so ``-m "not kafka"`` is the fast subset."""
    for item in items:
        # restartable_broker: a broker of the test's own (stopped and started again by it).
        if {"kafka_bootstrap", "restartable_broker"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


# Processes a test started (cli runs): killed after the test if still running.
STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """A failing test stops before it signals its processes: kill what is left, so nothing keeps
    consuming (and loading the machine) after it."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
