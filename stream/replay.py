"""Backfill: apply an event log (file or topic) at full speed through the live update code, and export state.

Files: JSON lines in the input-event format, or CSV with a column mapping
(e.g. MovieLens ``ratings.csv``: ``user_id=userId,item_id=movieId,rating=rating,ts=timestamp``
with ``ts_unit="s"``); ``.gz`` is read transparently.

Topics: read with ``assign()`` under a group id of its own (the live group
is never touched), from ``start`` (``earliest`` or epoch ms) to ``end``
(``latest`` = the end at the time of reading, or epoch ms). Start and end are
decided by each record's own timestamp (CreateTime); the broker's time index
(``offsets_for_times``) is only used to skip ahead, and only where it cannot
skip a wanted record.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from recstream.embeddings.model import epoch_rate_scale
from recstream.stream.checkpoint import CheckpointStore
from recstream.stream.config import ConfigError
from recstream.stream.events import EventDecoder
from recstream.stream.state import RecState

log = logging.getLogger(__name__)

CHUNK = 10_000


@dataclass
class ReplayResult:
    events_applied: int = 0
    rejected: int = 0
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.events_applied / self.seconds if self.seconds else 0.0


class Progress:
    """One self-updating line on stderr: events, events/s, and ETA when the total is known."""

    def __init__(self, enabled: bool = True, out: IO[str] = sys.stderr) -> None:
        self.enabled = enabled and out.isatty() if hasattr(out, "isatty") else enabled
        self.out = out
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, events: int, fraction: float | None = None, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.5):
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        line = f"\r{events:,} events  {events / elapsed:,.0f}/s"
        if fraction:
            line += f"  {fraction:6.1%}  ETA {elapsed * (1 - fraction) / fraction:5.0f}s"
        self.out.write(line + ("\n" if final else ""))
        self.out.flush()


def _open_binary(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(reader, raw file): the raw file's position measures progress even through gzip."""
    raw = open(path, "rb")
    return (gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw), raw


def parse_columns(spec: str | None) -> dict[str, str]:
    """``"user_id=userId,item_id=movieId"`` -> {"user_id": "userId", "item_id": "movieId"}."""
    if not spec:
        return {}
    mapping = {}
    for part in spec.split(","):
        field, sep, column = part.partition("=")
        if not sep or field.strip() not in ("user_id", "item_id", "event_type", "rating", "ts", "weight",
                                            "session_id"):
            raise ConfigError(f"--columns: expected FIELD=COLUMN with FIELD one of user_id, item_id, "
                             f"event_type, rating, ts, weight, session_id; got {part!r}")
        mapping[field.strip()] = column.strip()
    return mapping


def read_event_log(path: str | Path, columns: dict[str, str] | None = None, ts_unit: str = "ms",
                   chunk: int = CHUNK, delimiter: str = ",") -> Iterator[tuple[list, float]]:
    """Chunks of events (JSON bytes, or dicts from CSV) with the fraction of the file read so far."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--events: {path} is not a file")
    size = max(path.stat().st_size, 1)
    reader, raw = _open_binary(path)
    with raw:
        is_csv = columns is not None or path.name.removesuffix(".gz").endswith(".csv")
        events = _csv_events(reader, path, columns, ts_unit, delimiter) if is_csv else _json_lines(reader)
        batch: list = []
        for event in events:
            batch.append(event)
            if len(batch) >= chunk:
                yield batch, raw.tell() / size
                batch = []
        if batch:
            yield batch, 1.0


def _json_lines(reader: IO[bytes]) -> Iterator[bytes]:
    for line in reader:
        line = line.strip()
        if line:
            yield line


def _csv_events(reader: IO[bytes], path: Path, columns: dict[str, str] | None, ts_unit: str,
                delimiter: str) -> Iterator[dict]:
    """CSV rows as input-event dicts (values converted, the decoder checks them)."""
    rows = csv.DictReader(io.TextIOWrapper(reader, encoding="utf-8", newline=""), delimiter=delimiter)
    mapping = columns or {f: f for f in ("user_id", "item_id", "event_type", "rating", "ts")}
    missing = [c for f, c in mapping.items() if f in ("user_id", "item_id") and c not in (rows.fieldnames or [])]
    if missing:
        raise ConfigError(f"--columns: {path} has no column(s) {missing} (it has {rows.fieldnames}); "
                          f"map them with --columns FIELD=COLUMN,...")
    scale = {"ms": 1, "s": 1000}[ts_unit]
    for row in rows:
        event: dict = {}
        for field, column in mapping.items():
            value = row.get(column)
            if value is None or value == "":
                continue
            try:
                if field in ("rating", "weight"):
                    value = float(value)
                elif field == "ts":
                    value = int(float(value) * scale)
            except ValueError:
                pass  # left as text: the decoder rejects it with its reason
            event[field] = value
        yield event


def replay_file(state: RecState, decoder: EventDecoder, path: str | Path, epochs: int = 1,
                columns: dict[str, str] | None = None, ts_unit: str = "ms", progress: Progress | None = None
                ) -> ReplayResult:
    """Apply the log ``epochs`` times, in file order, to ``state``, step sizes decaying over the passes."""
    result = ReplayResult()
    started = time.monotonic()
    for epoch in range(epochs):
        for events, fraction in read_event_log(path, columns, ts_unit):
            batch, bad = decoder.decode(events)
            if bad:
                result.rejected += len(bad)
                if result.rejected <= 5:
                    log.warning("skipping a bad event in %s: %s", path, bad[0][1])
            if len(batch):
                state.apply(batch, rate_scale=epoch_rate_scale(epoch, epochs))
                result.events_applied += len(batch)
            if progress:
                progress.update(result.events_applied, (epoch + fraction) / epochs)
    result.seconds = time.monotonic() - started
    if progress:
        progress.update(result.events_applied, 1.0, final=True)
    return result


def replay_topic(state: RecState, decoder: EventDecoder, kafka: dict[str, str], topic: str,
                 start: str = "earliest", end: str = "latest", progress: Progress | None = None) -> ReplayResult:
    """Apply the records of ``topic`` with start <= CreateTime < end; positions record where each partition stopped."""
    start_ms = None if start == "earliest" else int(start)
    end_ms = None if end == "latest" else int(end)
    consumer = Consumer({
        "group.id": f"recstream-replay-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "queued.min.messages": 1_000_000,
        "fetch.queue.backoff.ms": 10,
        **kafka,
    })
    result = ReplayResult()
    started = time.monotonic()
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise ConfigError(f"--from-topic: topic {topic!r} does not exist")
        partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(metadata.topics[topic].partitions)]
        if start_ms is not None:
            for tp in partitions:
                tp.offset = start_ms
            partitions = consumer.offsets_for_times(partitions, timeout=30)
            for tp in partitions:
                if tp.offset < 0:  # no record at or after start by the broker's clock: read it all
                    tp.offset = OFFSET_BEGINNING
        consumer.assign(partitions)
        open_partitions = {tp.partition for tp in partitions}
        while open_partitions:
            messages = consumer.consume(CHUNK, 1.0)
            values, parts, finished = [], [], set()
            for m in messages:
                p = m.partition()
                if p not in open_partitions or p in finished:
                    continue
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        finished.add(p)
                        continue
                    raise RuntimeError(f"reading {topic}/{p}: {err.str()}")
                ts = m.timestamp()[1]
                if end_ms is not None and ts >= end_ms:
                    finished.add(p)
                    state.positions[f"{topic}/{p}"] = m.offset()
                    continue
                state.positions[f"{topic}/{p}"] = m.offset() + 1
                if start_ms is not None and ts < start_ms:
                    continue
                values.append(m.value())
                parts.append(p)
            if values:
                batch, bad = decoder.decode(values)
                result.rejected += len(bad)
                if len(batch):
                    state.apply(batch, topic, np.asarray(parts, dtype=np.int64)[batch.positions])
                    result.events_applied += len(batch)
            open_partitions -= finished
            if progress:
                progress.update(result.events_applied)
    finally:
        consumer.close()
    result.seconds = time.monotonic() - started
    if progress:
        progress.update(result.events_applied, final=True)
    return result


def export_state(state_dir: str | Path, out: str | Path) -> dict[str, int]:
    """Write the latest checkpoint's learned state as a pickle-free ``.npz``; returns sizes."""
    store = CheckpointStore(Path(state_dir) / "checkpoints")
    checkpoint = store.load_latest()
    if checkpoint is None:
        raise FileNotFoundError(f"no intact checkpoint in {Path(state_dir) / 'checkpoints'}")
    from recstream.embeddings.model import MFConfig

    stored = checkpoint.meta["model_config"]
    state = RecState.restore(checkpoint, MFConfig(**stored))
    model = state.model
    names = sorted(set(state.positions) | set(state.applied))
    np.savez(
        out,
        user_ids=np.array(model.users.ids.ids, dtype=str),
        user_vectors=model.users.vectors,
        user_bias=model.users.biases,
        item_ids=np.array(model.items.ids.ids, dtype=str),
        item_vectors=model.items.vectors,
        item_bias=model.items.biases,
        global_mean=np.float64(model.global_mean),
        partitions=np.array(names, dtype=str),
        offsets=np.array([state.positions.get(n, -1) for n in names], dtype=np.int64),
        events_applied=np.array([state.applied.get(n, 0) for n in names], dtype=np.int64),
        events_applied_total=np.int64(model.events_applied),
    )
    return {"users": len(model.users), "items": len(model.items), "events": model.events_applied}
