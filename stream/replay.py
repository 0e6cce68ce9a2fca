"""Backfill: apply an event log (file or topic) at full speed through the live update code, and export state.

Files: JSON lines in the input-event format, or CSV or Parquet with a column mapping
(e.g. MovieLens ``ratings.csv``: ``user_id=userId,item_id=movieId,rating=rating,ts=timestamp``
with ``ts_unit="s"``); ``.gz`` is read transparently (not for Parquet, which compresses inside).

Topics: read with ``assign()`` under a group id of its own (the live group
is never touched), from ``start`` (``earliest`` or epoch ms) to ``end``
(``latest`` = the end at the time of reading, or epoch ms). Start and end are
decided by each record's own timestamp (CreateTime); the broker's time index
(``offsets_for_times``) is only used to skip ahead, and only where it cannot
skip a wanted record.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import logging
import queue
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from recstream.embeddings.ids import CodedIds
from recstream.embeddings.model import epoch_rate_scale
from recstream.stream.checkpoint import CheckpointStore
from recstream.stream.clock import settle_timestamps
from recstream.stream.config import ConfigError
from recstream.stream.events import EventBatch, EventDecoder
from recstream.stream.logs import kafka_logger, settings_for
from recstream.stream.metrics import reason_label
from recstream.stream.state import RecState

log = logging.getLogger(__name__)

CHUNK = 10_000
# Chunks read and decoded ahead of the one being learned (see read_ahead).
READ_AHEAD = 2

T = TypeVar("T")


@dataclass
class ReplayResult:
    events_applied: int = 0
    rejected: int = 0
    seconds: float = 0.0
    rejected_reasons: Counter = dataclasses.field(default_factory=Counter)  # reason (fixed part) -> events

    def reject(self, bad: list[tuple[int, str]]) -> None:
        self.rejected += len(bad)
        self.rejected_reasons.update(reason_label(reason) for _, reason in bad)

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


# JSON lines are read this much at a time, cut at a line end: small enough that a block's decoded
# events (about 3k) are still in the CPU cache while their fields are checked.
BLOCK_BYTES = 1 << 18
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class LogChunk:
    """Decoded events of one piece of a log file."""

    batch: EventBatch
    bad: list[tuple[int, str]]  # (position in the piece, reason)
    fraction: float  # of the file read so far
    weights: np.ndarray | None = None  # a mapped ``weight`` column, per valid event (``recstream eval``)


def read_event_log(path: str | Path, decoder: EventDecoder, columns: dict[str, str] | None = None,
                   ts_unit: str = "ms", delimiter: str = ",") -> Iterator[LogChunk]:
    """The events of a log file in order, decoded and checked by ``decoder``, a piece at a time.

    JSON lines are read in blocks and decoded by ``EventDecoder.decode_lines`` (one msgspec call
    for thousands of lines); CSV rows become event dicts through the column mapping; Parquet is read
    one record batch at a time (bounded memory) through the same mapping. Every format gets the
    same checks, so a bad row is rejected with the same reason in each.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--events: {path} is not a file")
    if path.suffix in PARQUET_SUFFIXES:
        yield from _parquet_chunks(path, decoder, columns, ts_unit)
        return
    size = max(path.stat().st_size, 1)
    reader, raw = _open_binary(path)
    with raw:
        if columns is not None or path.name.removesuffix(".gz").endswith(".csv"):
            rows = _csv_events(reader, path, columns, ts_unit, delimiter)
            weighted = bool(columns) and "weight" in columns
            while events := list(islice(rows, CHUNK)):
                batch, bad = decoder.decode(events)
                weights = (np.array([float(events[p].get("weight", 1.0)) for p in batch.positions], dtype=np.float32)
                           if weighted else None)
                # The text reader closes the file when the rows run out: then all of it was read.
                yield LogChunk(batch, bad, 1.0 if raw.closed else raw.tell() / size, weights)
            return
        for block in _line_blocks(reader):
            yield LogChunk(*decoder.decode_lines(block), raw.tell() / size)


def _line_blocks(reader: IO[bytes]) -> Iterator[bytes]:
    """The file in pieces of about BLOCK_BYTES that end at a line end (a longer line is one piece)."""
    pending: list[bytes] = []  # the start of a line not ended yet (a list: a huge line is not copied over and over)
    while chunk := reader.read(BLOCK_BYTES):
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            pending.append(chunk)
            continue
        yield b"".join([*pending, chunk[:cut]])
        pending = [chunk[cut:]]
    if rest := b"".join(pending):
        yield rest


def _missing_columns(path: Path, mapping: dict[str, str], available: list[str], explicit: bool) -> None:
    """Ids must have a column; with an explicit mapping every mapped column must exist (a typo in a
    rating column would otherwise turn a rated log into clicks without a word)."""
    needed = mapping.items() if explicit else [(f, c) for f, c in mapping.items() if f in ("user_id", "item_id")]
    missing = [c for f, c in needed if c not in available]
    if missing:
        raise ConfigError(f"--columns: {path} has no column(s) {missing} (it has {available}); "
                          f"map them with --columns FIELD=COLUMN,...")


DEFAULT_COLUMNS = {f: f for f in ("user_id", "item_id", "event_type", "rating", "ts")}


def _csv_events(reader: IO[bytes], path: Path, columns: dict[str, str] | None, ts_unit: str,
                delimiter: str) -> Iterator[dict]:
    """CSV rows as input-event dicts (values converted, the decoder checks them)."""
    rows = csv.DictReader(io.TextIOWrapper(reader, encoding="utf-8", newline=""), delimiter=delimiter)
    mapping = columns or DEFAULT_COLUMNS
    _missing_columns(path, mapping, rows.fieldnames or [], bool(columns))
    scale = {"ms": 1, "s": 1000}[ts_unit]
    for row in rows:
        event: dict = {}
        for field, column in mapping.items():
            value = row.get(column)
            if value is None or value == "":
                continue
            event[field] = _converted(field, value, scale)
        yield event


def _converted(field: str, value: str | float, scale: int) -> object:
    """A text value (CSV, or a Parquet text column) or a float ts as the field's type; left as it is
    if it is not one (the decoder rejects it with its reason)."""
    try:
        if field in ("rating", "weight"):
            return float(value)
        if field == "ts":
            return int(float(value) * scale)
    except (ValueError, OverflowError):
        pass
    return value


def _parquet_chunks(path: Path, decoder: EventDecoder, columns: dict[str, str] | None, ts_unit: str
                    ) -> Iterator[LogChunk]:
    """A Parquet log one record batch at a time, through the column mapping (as for CSV)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("Parquet input needs pyarrow: pip install 'recstream[parquet]'") from exc
    log_file = pq.ParquetFile(path)
    available = log_file.schema_arrow.names
    mapping = columns or DEFAULT_COLUMNS
    _missing_columns(path, mapping, available, bool(columns))
    mapping = {f: c for f, c in mapping.items() if c in available}
    for field in ("user_id", "item_id"):
        kind = log_file.schema_arrow.field(mapping[field]).type
        if not _is_id_type(kind):
            raise ConfigError(f"--columns: {path} column {mapping[field]!r} ({field}) is {kind}; "
                              f"ids must be strings or integers")
    total = max(log_file.metadata.num_rows, 1)
    scale = {"ms": 1, "s": 1000}[ts_unit]
    done = 0
    for record_batch in log_file.iter_batches(batch_size=CHUNK, columns=sorted(set(mapping.values()))):
        n = record_batch.num_rows
        values = {f: _column_values(f, record_batch.column(c), scale) for f, c in mapping.items()}
        fields = tuple(values.get(f, [None] * n)
                       for f in ("user_id", "item_id", "event_type", "rating", "ts", "session_id"))
        batch, bad = decoder.decode_columns(fields)
        weights = None
        if "weight" in values:
            column = values["weight"]
            weights = np.array([1.0 if column[p] is None else column[p] for p in batch.positions], dtype=np.float32)
        done += n
        yield LogChunk(batch, bad, done / total, weights)


def _is_id_type(kind: object) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)


def _column_values(field: str, column: object, scale: int) -> list | CodedIds | np.ndarray:
    """A Parquet column as the Python values the decoder checks (None for nulls), as ``_csv_events``
    makes them from text: ids as they are, ratings and weights as floats, ts in ms."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.dictionary_decode(), kind.value_type
    if column.null_count == len(column):
        return [None] * len(column)
    if field in ("user_id", "item_id", "event_type"):
        # Each distinct id is checked and looked up once (Arrow encodes in order of first appearance).
        encoded = pc.dictionary_encode(column)
        values = encoded.dictionary.to_pylist()
        codes = encoded.indices
        if codes.null_count:  # a null is a missing value: None, which the decoder names
            codes = pc.fill_null(codes, len(values))
            values.append(None)
        return CodedIds.first_appearance(values, codes.to_numpy())
    if field == "ts":
        if pa.types.is_timestamp(kind):  # a time type: its own unit, whatever --ts-unit says
            unit, times, kind, scale = kind.unit, column.cast(pa.int64()), pa.int64(), 1
            column = pc.multiply(times, 1000) if unit == "s" else times if unit == "ms" else \
                pc.divide(times, {"us": 1000, "ns": 1_000_000}[unit])
        if pa.types.is_integer(kind):
            if scale == 1 and not column.null_count:
                return column.to_numpy()
            values = column.to_pylist()  # exact integers: a product past int64 is rejected, not wrapped
            return values if scale == 1 else [None if v is None else v * scale for v in values]
        if pa.types.is_floating(kind):
            return [None if v is None else _converted(field, v, scale) for v in column.to_pylist()]
    if field in ("rating", "weight") and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        column = column.cast(pa.float64())
        return column.to_numpy() if field == "rating" and not column.null_count else column.to_pylist()
    values = column.to_pylist()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if field in ("rating", "weight", "ts"):
            return [None if v is None else _converted(field, v, scale) for v in values]
    return values


def replay_file(state: RecState, decoder: EventDecoder, path: str | Path, epochs: int = 1,
                columns: dict[str, str] | None = None, ts_unit: str = "ms", progress: Progress | None = None
                ) -> ReplayResult:
    """Apply the log ``epochs`` times, in file order, to ``state``, step sizes decaying over the passes."""
    result = ReplayResult()
    started = time.monotonic()
    for epoch in range(epochs):
        for chunk in read_ahead(read_event_log(path, decoder, columns, ts_unit)):
            if chunk.bad:
                result.reject(chunk.bad)
                if result.rejected <= 5:
                    log.warning("skipping a bad event in %s: %s", path, chunk.bad[0][1])
            if len(chunk.batch):
                state.apply(chunk.batch, rate_scale=epoch_rate_scale(epoch, epochs))
                result.events_applied += len(chunk.batch)
            if progress:
                progress.update(result.events_applied, (epoch + chunk.fraction) / epochs)
    result.seconds = time.monotonic() - started
    if progress:
        progress.update(result.events_applied, 1.0, final=True)
    return result


class _ReadFailed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def read_ahead(chunks: Iterator[T], depth: int = READ_AHEAD) -> Iterator[T]:
    """``chunks``, produced on a thread of their own up to ``depth`` ahead of the caller.

    Reading and decoding a log hold the GIL; the learning kernels release it. With the
    decoding on another thread, the next chunk is decoded while this one is learned, on the
    other core. The order is unchanged; an error of the reader is raised here, at its place in
    the sequence; leaving the loop early stops the reader and closes ``chunks``.

    >>> list(read_ahead(iter(range(5))))
    [0, 1, 2, 3, 4]
    """
    handoff: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            with closing(chunks) if hasattr(chunks, "close") else nullcontext():
                for chunk in chunks:
                    if not put(chunk):
                        return
        except BaseException as error:  # handed to the caller, raised there
            put(_ReadFailed(error))
            return
        put(end)

    reader = threading.Thread(target=read, name="log-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = handoff.get()
            if item is end:
                return
            if isinstance(item, _ReadFailed):
                raise item.error
            yield item
    finally:
        stop.set()
        reader.join()


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
        "logger": kafka_logger(),
        **settings_for("consumer", kafka),
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
            values, parts, record_ts, finished = [], [], [], set()
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
                record_ts.append(ts)
            if values:
                batch, bad = decoder.decode(values)
                result.reject(bad)
                if len(batch):
                    # Event times as live consumption settles them (stream/clock.py): the same state.
                    settle_timestamps(batch.timestamps, np.asarray(record_ts, dtype=np.int64)[batch.positions],
                                      decoder.clock_tolerance_ms)
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
    held = np.setdiff1d(np.arange(len(model.users)), model.users.ids.free)  # rows of forgotten users: no one's
    items = np.setdiff1d(np.arange(len(model.items)), model.items.ids.free)
    np.savez(
        out,
        user_ids=np.array(model.users.ids.ids_of(held.tolist()), dtype=str),
        user_vectors=model.users.vectors[held],
        user_bias=model.users.biases[held],
        item_ids=np.array(model.items.ids.ids_of(items.tolist()), dtype=str),
        item_vectors=model.items.vectors[items],
        item_bias=model.items.biases[items],
        global_mean=np.float64(model.global_mean),
        partitions=np.array(names, dtype=str),
        offsets=np.array([state.positions.get(n, -1) for n in names], dtype=np.int64),
        events_applied=np.array([state.applied.get(n, 0) for n in names], dtype=np.int64),
        events_applied_total=np.int64(model.events_applied),
    )
    return {"users": len(held), "items": len(items), "events": model.events_applied}
