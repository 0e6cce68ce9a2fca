"""Logging set-up: text or JSON lines, and librdkafka's own log lines through ``logging``.

librdkafka writes to stderr by itself unless a client is given a Python logger;
then its lines arrive as records of ``recstream.librdkafka`` (served from the
clients' poll calls), take the service's format and level, and repeats are
folded: a broker that is down makes librdkafka say the same "Connect ...
failed" every 50 ms per client.
"""

from __future__ import annotations

import logging
import re
import threading
import time

KAFKA_LOGGER_NAME = "recstream.librdkafka"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_DIGITS = re.compile(r"\d+")

# librdkafka's own classification (librdkafka CONFIGURATION.md, "C/P" column): a setting of the
# other kind makes the client warn that it ignores it, so -X and [kafka] settings go only to the
# client they belong to. Settings in neither set apply to both.
CONSUMER_ONLY = frozenset("""
group.id group.instance.id partition.assignment.strategy session.timeout.ms heartbeat.interval.ms
group.protocol.type group.protocol group.remote.assignor coordinator.query.interval.ms max.poll.interval.ms
enable.auto.commit auto.commit.interval.ms enable.auto.offset.store queued.min.messages
queued.max.messages.kbytes fetch.wait.max.ms fetch.queue.backoff.ms fetch.message.max.bytes
max.partition.fetch.bytes fetch.max.bytes fetch.min.bytes fetch.error.backoff.ms offset.store.method
isolation.level enable.partition.eof check.crcs max.poll.records share.acknowledgement.mode
auto.commit.enable auto.offset.reset offset.store.path offset.store.sync.interval.ms
consume.callback.max.messages
""".split())
PRODUCER_ONLY = frozenset("""
transactional.id transaction.timeout.ms enable.idempotence enable.gapless.guarantee
queue.buffering.max.messages queue.buffering.max.kbytes queue.buffering.max.ms linger.ms
message.send.max.retries retries queue.buffering.backpressure.threshold compression.codec compression.type
batch.num.messages batch.size delivery.report.only.error sticky.partitioning.linger.ms
request.required.acks acks request.timeout.ms message.timeout.ms delivery.timeout.ms queuing.strategy
produce.offset.report partitioner compression.level
""".split())


def settings_for(client: str, settings: dict[str, str]) -> dict[str, str]:
    """The librdkafka ``settings`` that apply to a ``"consumer"`` or a ``"producer"``.

    >>> settings_for("producer", {"session.timeout.ms": "6000", "linger.ms": "5", "sasl.username": "u"})
    {'linger.ms': '5', 'sasl.username': 'u'}
    >>> settings_for("consumer", {"session.timeout.ms": "6000", "linger.ms": "5", "sasl.username": "u"})
    {'session.timeout.ms': '6000', 'sasl.username': 'u'}
    """
    other = PRODUCER_ONLY if client == "consumer" else CONSUMER_ONLY
    return {k: v for k, v in settings.items() if k not in other}


class RepeatFilter(logging.Filter):
    """Lets a message through once per ``window_s``; the next one that passes says how many were held back.

    Messages count as the same when they differ only in numbers (ports, timings).
    """

    def __init__(self, window_s: float = 60.0, clock=time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self._seen: dict[tuple, list] = {}  # key -> [time let through, held back since]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, _DIGITS.sub("#", record.getMessage()))
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window_s:
                entry[1] += 1
                return False
            held = entry[1] if entry is not None else 0
            self._seen[key] = [now, 0]
            if len(self._seen) > 10_000:  # forget the oldest half rather than grow without bound
                for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:5_000]:
                    del self._seen[old]
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {self.window_s:.0f}s)"
        return True


def kafka_logger() -> logging.Logger:
    """The logger to pass to confluent-kafka clients as ``"logger"``: their lines, folded."""
    logger = logging.getLogger(KAFKA_LOGGER_NAME)
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter())
    return logger


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Root logging for the command line: ``text`` lines or ``json`` objects, one per line."""
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level",
                                                          "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class StatusLog:
    """A status line every ``interval_s`` from a thread of its own, whether or not events flow.

    Rates are over the last interval; ``events`` counts this process's events,
    ``model_events`` everything the model learned (restored checkpoints included).
    Before the group assigns partitions it says that it is waiting for them.
    """

    def __init__(self, service, interval_s: float, logger: logging.Logger | None = None) -> None:
        self.service = service
        self.interval_s = interval_s
        self.log = logger or logging.getLogger("recstream")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._last = (self._started, 0, 0, 0)

    def __enter__(self) -> StatusLog:
        self._thread = threading.Thread(target=self._run, name="status-log", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.log.info("%s", self.line())

    def line(self) -> str:
        service = self.service
        s = service.stats
        now = time.monotonic()
        then, events, dead, updates = self._last
        self._last = (now, s.events_applied, s.dead_letters, s.updates_published)
        if not s.assigned:
            return (f"waiting for partition assignment (group {service.config.topics.group_id}, "
                    f"{now - self._started:.0f}s since start); events={s.events_applied}")
        elapsed = max(now - then, 1e-9)
        index = service.refresher.current
        return (f"events={s.events_applied} (+{s.events_applied - events} in {elapsed:.0f}s, "
                f"{(s.events_applied - events) / elapsed:,.0f}/s) model_events={service.model.events_applied} "
                f"users={service.model.users.ids.live} items={service.model.items.ids.live} "
                f"index=v{index.version if index else 0}"
                + (f" (age {now - index.built_at:.0f}s)" if index else "")
                + f" dead_letters={s.dead_letters} (+{s.dead_letters - dead}) updates={s.updates_published} "
                f"(+{s.updates_published - updates}) commits={s.commits} checkpoints={s.checkpoints} "
                f"partitions={len(s.assigned)} loss={s.loss_mean:.4f} loss_drifts={s.loss_drifts} "
                f"item_drift={s.item_drift:.3f}")
