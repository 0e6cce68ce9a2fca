"""The service's producer: every record is delivered, or kept and produced again.

Output updates, dead letters, item deltas and handed-over users all go through one
:class:`OutputProducer`. A record the producer refuses (too large, unknown topic) or whose delivery
fails joins a list of failed records; :meth:`OutputProducer.deliver_all` waits for the deliveries
and produces the failed records again with backoff until every one is delivered, while the caller
keeps its consumer in the group (``wait``). Offsets are committed only after ``deliver_all``
returns True, so nothing read is lost to a broker that was away. A fatal producer error (e.g. a
fenced idempotent producer) ends a producer instance for good: it is replaced, and what it held is
produced again by the new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from recstream.stream.broker import produce_waiting

log = logging.getLogger(__name__)

DLQ_TRUNCATE_BYTES = 64 * 1024

# (topic, key, value, headers, partition or -1: the partitioner's choice) to produce again
FailedRecord = tuple[str, bytes | None, bytes | None, list | None, int]


class OutputProducer:
    """A confluent-kafka producer whose failures are kept and produced again.

    ``stats`` gets ``delivery_failures``. Dead letters (to ``dlq_topic``) too large for the producer
    or the broker are cut to their head, with a ``recstream.truncated_from`` header giving the
    original size, instead of being retried forever.
    """

    def __init__(self, config: dict[str, Any], dlq_topic: str, stats: Any) -> None:
        self.config = config
        self.dlq_topic = dlq_topic
        self.stats = stats
        self.producer = Producer(config)
        self.failed: list[FailedRecord] = []
        self.fatal = False

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: list | None = None,
                partition: int = -1) -> None:
        """Produce one record (waiting while the local queue is full); a record the producer
        refuses is kept with the failed deliveries."""
        while True:
            try:
                produce_waiting(self.producer, topic, value, key, partition, headers=headers,
                                on_delivery=self._delivered)
                return
            except KafkaException as exc:  # refused before sending, e.g. over the producer's message.max.bytes
                error = exc.args[0]
                if error.code() == KafkaError.MSG_SIZE_TOO_LARGE and topic == self.dlq_topic:
                    shorter, headers = self.truncated_letter(value, headers)
                    if len(shorter) < len(value or b""):
                        value = shorter
                        continue
                # Kept with the failed deliveries: retried with backoff, offsets held, the log says why.
                log.error("producing to %s failed: %s", topic, error.str())
                self.stats.delivery_failures += 1
                self.failed.append((topic, key, value, headers, partition))
                return

    def truncated_letter(self, value: bytes | None, headers: list | None) -> tuple[bytes, list]:
        """A dead letter the producer cannot send whole: its head, and a header saying how big it was
        (rather than retry forever and stall the partition)."""
        value = value or b""
        limit = int(self.config.get("message.max.bytes", DLQ_TRUNCATE_BYTES * 2))
        keep = min(DLQ_TRUNCATE_BYTES, limit // 2)
        if not any(name == "recstream.truncated_from" for name, _ in headers or []):
            headers = [*(headers or []), ("recstream.truncated_from", str(len(value)).encode())]
        return value[:keep], headers

    def _delivered(self, err: KafkaError | None, message: Message) -> None:
        if err is None:
            return
        self.stats.delivery_failures += 1
        if err.fatal() or err.code() == KafkaError.PRODUCER_FENCED:
            self.fatal = True
        value, headers = message.value(), message.headers()
        if err.code() == KafkaError.MSG_SIZE_TOO_LARGE and message.topic() == self.dlq_topic:
            value, headers = self.truncated_letter(value, headers)  # the broker will never take it whole
        # A record produced to a chosen partition must go there again (a handover); keyed ones go
        # where the key takes them anyway.
        self.failed.append((message.topic(), message.key(), value, headers, message.partition()))

    def deliver_all(self, timeout_s: float, patient: bool, stopping: Callable[[], bool],
                    wait: Callable[[float], None]) -> bool:
        """Wait until everything produced is delivered, producing failures again with backoff.

        ``wait(seconds)`` is how the caller spends a backoff (a consumer keeps polling, so it stays
        in its group). Returns False if ``stopping()`` while deliveries still fail, or at the first
        failure when not ``patient``: failed records stay kept for the next call.
        """
        backoff = 0.5
        while True:
            remaining = self.producer.flush(timeout_s)
            if remaining == 0 and not self.failed:
                return True
            if not patient:
                log.warning("%d message(s) undelivered, %d failed; offsets not committed", remaining, len(self.failed))
                return False
            failed, self.failed = self.failed, []
            if stopping() and backoff > 0.5:
                log.error("stopping with %d undelivered message(s); offsets not committed", remaining + len(failed))
                return False
            log.warning("%d message(s) undelivered, %d failed; retrying in %.1fs (offsets not committed)",
                        remaining, len(failed), backoff)
            if self.fatal:
                self._replace()
            wait(backoff)
            for record in failed:
                self.produce(*record)
            backoff = min(backoff * 2, 30.0)

    def flush(self, timeout_s: float) -> int:
        return self.producer.flush(timeout_s)

    def _replace(self) -> None:
        log.warning("producer hit a fatal error; starting a new one")
        old = self.producer
        old.purge()
        old.flush(0)  # serves the purged messages' delivery reports: they join the failed and are re-sent
        self.producer = Producer(self.config)
        self.fatal = False
