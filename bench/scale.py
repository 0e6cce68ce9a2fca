"""The service at scale, on the embedded broker, in one invocation.

Workload: a generated clickstream (``SyntheticClickstream``) of ``--users`` users
(Zipf 0.8 activity) and ``--items`` items (Zipf 1.0 popularity), string ids
("u123", "i456"), ``--events`` events pre-produced to a ``--partitions``-partition
topic; then the service with its defaults (only topics, group, ``output.publish``
and the fast-test group-join timeouts are set).

(a) catch-up throughput without and with publishing: events/s from the
    service's start to the commit of the last event ("total") and from the
    first applied batch ("steady"), output messages per event, and the ratio;
(b) freshness under a live load: a producer process paces ``--live-rate``
    events/s for ``--live-seconds``, each event's ``ts`` its produce time; for
    probe events, the time until an independent consumer of the output topic
    receives the first update for that user whose ``last_event_ts`` covers the
    probe (the live service starts from the catch-up's checkpoint; the producer
    starts once it has its partitions);
(c) recall@10 of the lists the service publishes (the same call, at the end of
    the publishing catch-up) against the exact top-10 by brute force over all
    items, with the same exclusions;
(d) peak RSS of each service process, model array bytes per user and per item,
    and the RSS growth over the process's baseline;
(e) the time of an Annoy build over the catch-up's item vectors, and the
    consumer's events/s while such a build runs against outside it (same run).

Every service phase runs in its own process (multiprocessing "spawn"), so its
peak RSS is its own. Writes JSON (``--out``) and prints a markdown table.

    python bench/scale.py [--quick] [--users N --items N --events N --partitions N]
        [--live-rate R --live-seconds S --repeats R --recall-users N --out PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import Consumer, KafkaError, Producer
from recstream.embeddings.model import _ITEM_ARRAYS, _USER_ARRAYS
from recstream.index.build import build_in_subprocess, mips_item_vectors, mips_query
from recstream.stream.broker import EmbeddedBroker, create_topics, produce_all, produce_waiting
from recstream.stream.checkpoint import CheckpointStore
from recstream.stream.config import load_config
from recstream.stream.service import RecStreamService
from recstream.stream.synthetic import EVENT_TYPES, SyntheticClickstream, SyntheticEvents

SPAWN = mp.get_context("spawn")
# Only group joins are sped up (see /work/shared/BROKER-NOTES.md); everything else is the defaults.
FAST_JOIN = {"kafka.consumer.session.timeout.ms": "2000", "kafka.consumer.heartbeat.interval.ms": "300"}
WARMUP_S = 10.0
OVERRIDES: dict[str, str] = {}  # --set: service settings for every phase (e.g. a low-latency setting)
K = 10


# -- measurements inside a process ------------------------------------------------------------

def current_rss() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes.

    VmHWM, not ``getrusage``'s ``ru_maxrss``: Linux carries ``ru_maxrss`` over from the
    parent across fork and exec, so a spawned child would report the generator's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def model_bytes(model) -> dict:
    """The model's array bytes per user row and per item row (used rows; capacity is at most 2x)."""
    arrays = model.state_arrays()
    user_keys = {s.key for s in _USER_ARRAYS if s.key}
    item_keys = {s.key for s in _ITEM_ARRAYS if s.key}
    user = sum(v.nbytes for k, v in arrays.items() if k.startswith("users.") or k in user_keys)
    item = sum(v.nbytes for k, v in arrays.items() if k.startswith("items.") or k in item_keys)
    n_users, n_items = len(model.users), len(model.items)
    return {"users": n_users, "items": n_items, "user_array_bytes": user, "item_array_bytes": item,
            "array_bytes_per_user": user / max(n_users, 1), "array_bytes_per_item": item / max(n_items, 1)}


def published_lists(recommender, user_rows: np.ndarray, index, now_ms: int, use_index: bool = True
                    ) -> list[np.ndarray]:
    """Item rows, best first, for each of ``user_rows``: what the service would publish now
    (``use_index=False``: what it publishes while behind, from the hot set alone)."""
    top = recommender.recommend(user_rows, index, now_ms, use_index=use_index)
    return [top.of(n)[0] for n in range(len(top))]


def exact_top(model, history, user_rows: np.ndarray, now_ms: int, k: int, sessions=None) -> list[np.ndarray]:
    """Exact top-k by brute force over all items (remembered items excluded), best first; with
    ``sessions`` (the service's session signals), the blended score the service ranks by:
    ``session_mf_weight * factor score + signals`` for a user whose session reaches any item."""
    Q, biases = model.items.vectors, model.ranking_biases()
    users = model.query_vectors(user_rows, now_ms)
    found = sessions.candidates(user_rows, now_ms) if sessions is not None and sessions.enabled else None
    weight = np.float32(model.config.session_mf_weight)
    step = max(1, 50_000_000 // max(len(Q), 1))  # float32 scores per chunk: 200 MB
    out = []
    for start in range(0, len(user_rows), step):
        scores = users[start:start + step] @ Q.T
        scores += biases
        for n, u in enumerate(user_rows[start:start + step].tolist()):
            row = scores[n]
            if found is not None and len(found[start + n][0]):
                rows, blend = found[start + n]
                row *= weight
                row[rows] += blend
            if history is not None:
                seen = np.fromiter(history.items_of(u), dtype=np.int64)
                row[seen] = -np.inf
            top = np.argpartition(-row, k)[:k] if len(row) > k else np.arange(len(row))
            top = top[np.argsort(-row[top], kind="stable")]
            out.append(top[np.isfinite(row[top])])
    return out


def recall_sample(stream_users: np.ndarray, applied: int, n: int, seed: int) -> list[str]:
    """``n`` ids of users with events in the last 10% of what was applied (a run stopped by
    ``--phase-timeout`` applied a prefix of the stream, roughly: partitions advance unevenly)."""
    tail = np.unique(stream_users[int(0.9 * applied):applied])
    chosen = np.random.default_rng(seed).choice(tail, size=min(n, len(tail)), replace=False)
    return [f"u{u}" for u in chosen.tolist()]


def recall_at_k(published: list[np.ndarray], exact: list[np.ndarray]) -> float:
    """Mean over users of |published ∩ exact| / |exact| (users with an empty exact list skipped).

    >>> recall_at_k([np.array([1, 2, 3]), np.array([7])], [np.array([1, 2, 4]), np.array([7])])
    0.8333333333333334
    """
    values = [len(np.intersect1d(p, e)) / len(e) for p, e in zip(published, exact) if len(e)]
    return float(np.mean(values)) if values else float("nan")


def index_recall(service: RecStreamService, user_rows: np.ndarray, now_ms: int) -> float:
    """Recall@10 of the Annoy index alone (the service's ``search_k``, remembered items removed)
    against the exact top-10 over the vectors the index was built from: what the index gives
    wherever the exact scoring of changed items does not cover the top-10."""
    index = service.refresher.current
    points = np.array([index.annoy.get_item_vector(i) for i in range(index.n_items)], dtype=np.float32)
    users = service.model.query_vectors(user_rows, now_ms)
    queries = np.hstack([users, np.ones((len(users), 1), dtype=np.float32)])  # [p, 1] . [q, b] = p.q + b
    history = service.state.history if service.config.output.exclude_seen else None
    found, exact = [], []
    for n, u in enumerate(user_rows.tolist()):
        seen = history.items_of(u) if history is not None else {}
        fetch = K + len(seen)
        got = [i for i in index.nearest(mips_query(users[n]), fetch, service.config.index.search_k) if i not in seen]
        found.append(np.array(got[:K], dtype=np.int64))
        scores = points[:, :-1] @ queries[n]
        seen_rows = np.fromiter((i for i in seen if i < len(scores)), dtype=np.int64)
        scores[seen_rows] = -np.inf
        top = np.argpartition(-scores, K)[:K] if len(scores) > K else np.arange(len(scores))
        exact.append(top[np.isfinite(scores[top])])
    return recall_at_k(found, exact)


def measure_recall(service: RecStreamService, user_ids: list[str]) -> dict:
    model = service.model
    rows = np.array([r for r in (model.users.ids.get(u) for u in user_ids) if r is not None], dtype=np.int64)
    now_ms = service.stats.last_event_ts  # what the service publishes with
    index = service.refresher.current
    history = service.state.history if service.config.output.exclude_seen else None
    with service.model_lock:
        started = time.perf_counter()
        published = published_lists(service.recommender, rows, index, now_ms)
        service_s = time.perf_counter() - started
        lookups = service.recommender.last.index_lookups
        hot_only = published_lists(service.recommender, rows, index, now_ms, use_index=False)
        started = time.perf_counter()
        exact = exact_top(model, history, rows, now_ms, K, service.state.sessions)
        exact_s = time.perf_counter() - started
        changed = model.items_changed_since(index.model_version) if index is not None else np.arange(len(model.items))
    exact_items = np.concatenate(exact) if exact else np.zeros(0, dtype=np.int64)
    return {
        "users": len(rows), "recall_at_10": recall_at_k(published, exact),
        "recall_at_10_hot_set_only": recall_at_k(hot_only, exact), "index_lookups": lookups,
        "service_ms_per_user": 1000 * service_s / max(len(rows), 1),
        "brute_force_ms_per_user": 1000 * exact_s / max(len(rows), 1),
        "index_items": index.n_items if index is not None else 0, "model_items": len(model.items),
        "items_changed_since_index": len(changed),
        # Exact top-10 entries the index must supply (unchanged since its build; the rest are scored exactly).
        "exact_top_share_from_index": float(1 - np.isin(exact_items, changed).mean()) if len(exact_items) else 0.0,
        "index_alone_recall_at_10": index_recall(service, rows, now_ms) if index is not None else None,
    }


# -- service phases (each in its own spawned process) -------------------------------------------

def service_config(bootstrap: str, topic: str, output: str, publish: bool, state_dir: str = "",
                   overrides: dict | None = None):
    """The service's defaults, plus the benchmark's topics and group, and ``--set`` overrides."""
    tag = uuid.uuid4().hex[:8]
    return load_config(overrides={
        "kafka.bootstrap.servers": bootstrap, **FAST_JOIN, "topics.input": topic, "topics.output": output,
        "topics.dead_letter": f"{topic}.dlq", "topics.group_id": f"scale-{tag}", "output.publish": publish,
        "state_dir": state_dir, **(overrides or {}),
    })


def catch_up_child(conn, progress, settings: dict) -> None:
    """Consume ``settings['events']`` pre-produced events; send back rates, memory and, if asked,
    recall, a checkpoint of the final state and the final item vectors as index points."""
    logging.basicConfig(level=logging.WARNING)
    baseline = current_rss()
    config = service_config(settings["bootstrap"], settings["topic"], settings["output"], settings["publish"],
                            overrides=settings.get("overrides"))
    n = settings["events"]
    timeline: list[tuple[float, int, int]] = []  # (wall time, events applied, updates published) per flush
    deadline = time.time() + settings["timeout_s"]

    index_timeline: list[tuple[float, int, int, int]] = []

    def on_flush(service: RecStreamService) -> None:
        applied = service.stats.events_applied
        timeline.append((time.time(), applied, service.stats.updates_published))
        if settings["publish"]:
            index_timeline.append((time.time(), *index_state(service)))
        progress.value = applied
        if applied >= n or time.time() > deadline:
            service.stop.set()

    service = RecStreamService(config, on_flush=on_flush)
    started = time.time()
    service.run()
    result = {"pid": os.getpid(), "started": started, "timeline": timeline, "finished": timeline[-1][1] >= n,
              "events_applied": service.stats.events_applied, "updates_published": service.stats.updates_published,
              "index_builds": service.refresher.builds, "baseline_rss": baseline, "peak_rss": peak_rss(),
              "rss_after": current_rss(), **model_bytes(service.model)}
    result.update(rates(started, timeline))
    if settings["publish"]:
        result["index"] = index_summary(started, index_timeline)
    if settings.get("recall_users"):
        result["recall"] = measure_recall(service, recall_sample(np.load(settings["stream_users_path"]),
                                                                 service.stats.events_applied,
                                                                 settings["recall_users"], settings["seed"]))
    if settings.get("save_state_dir"):
        store = CheckpointStore(Path(settings["save_state_dir"]) / "checkpoints", config.checkpoint.keep)
        service.state.save(store)
    if settings.get("points_path"):
        np.save(settings["points_path"], mips_item_vectors(service.model.items.vectors,
                                                           service.model.ranking_biases()))
    conn.send(result)


def index_state(service: RecStreamService) -> tuple[int, int, int]:
    """(items in the model, items in the current index, items changed since its build)."""
    index = service.refresher.current
    with service.model_lock:
        n_items = len(service.model.items)
        changed = len(service.model.items_changed_since(index.model_version)) if index is not None else n_items
    return n_items, index.n_items if index is not None else 0, changed


def index_summary(started: float, index_timeline: list[tuple[float, int, int, int]]) -> dict:
    """How publishing found the index at each flush: while there is none, or once half the items
    changed since its build, ``Recommender`` scores every item exactly for every user."""
    built = [t for t, _, index_items, _ in index_timeline if index_items]
    shares = np.array([changed / max(n, 1) for _, n, _, changed in index_timeline])
    return {"first_index_s": built[0] - started if built else None, "flushes": len(index_timeline),
            "flush_share_without_index": float(np.mean([i == 0 for _, _, i, _ in index_timeline])) if shares.size else 0.0,
            "flush_share_exact_all": float(np.mean(shares >= 0.5)) if shares.size else 0.0,
            "median_changed_share": float(np.median(shares)) if shares.size else 0.0}


def rates(started: float, timeline: list[tuple[float, int, int]]) -> dict:
    """Events/s from the start to the last flush ("total") and from the first flush that applied events."""
    done_t, done_n = timeline[-1][0], timeline[-1][1]
    first = next((t, e) for t, e, _ in timeline if e > 0)
    steady = (done_n - first[1]) / (done_t - first[0]) if done_t > first[0] else float("nan")
    return {"seconds": done_t - started, "events_per_s": done_n / (done_t - started), "steady_events_per_s": steady,
            "first_batch_s": first[0] - started}


def live_service_child(conn, progress, ready, stop, settings: dict) -> None:
    """The service on the live topic, restored from the catch-up's checkpoint, until ``stop``."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if settings.get("log_rounds"):  # each round's size and time, as the service logs them at debug level
        logging.getLogger("recstream.stream.service").setLevel(logging.DEBUG)
    baseline = current_rss()
    config = service_config(settings["bootstrap"], settings["topic"], settings["output"], True,
                            settings["state_dir"], settings.get("overrides"))
    timeline: list[tuple[float, int, int]] = []

    index_timeline: list[tuple[float, int, int, int]] = []

    def on_flush(service: RecStreamService) -> None:
        timeline.append((time.time(), service.stats.events_applied, service.stats.updates_published))
        index_timeline.append((time.time(), *index_state(service)))
        progress.value = service.stats.events_applied

    started = time.time()
    service = RecStreamService(config, on_flush=on_flush)
    restore_s = time.time() - started
    threading.Thread(target=lambda: (stop.wait(), service.stop.set()), daemon=True).start()

    def ready_once_assigned() -> None:  # kernels loaded, group joined: what a running service is
        while not service.stats.assigned and not service.stop.is_set():
            time.sleep(0.05)
        ready.set()

    threading.Thread(target=ready_once_assigned, daemon=True).start()
    service.run()
    conn.send({"pid": os.getpid(), "restore_s": restore_s, "events_applied": service.stats.events_applied,
               "updates_published": service.stats.updates_published, "checkpoints": service.stats.checkpoints,
               "index_builds": service.refresher.builds, "baseline_rss": baseline, "peak_rss": peak_rss(),
               "timeline": timeline, "index": index_summary(started, index_timeline), **model_bytes(service.model)})


def live_producer_child(conn, settings: dict) -> None:
    """Produce the live events at ``rate``/s in 10 ms slices, ``ts`` = produce time; every
    ``probe_every``-th event is a probe."""
    live = np.load(settings["events_path"])
    users, items, types = live["users"].tolist(), live["items"].tolist(), live["event_types"].tolist()
    producer = Producer({"bootstrap.servers": settings["bootstrap"], "linger.ms": 5})
    rate, n, probe_every = settings["rate"], len(users), settings["probe_every"]
    slice_s = 0.01
    per_slice = max(1, round(rate * slice_s))
    probe_users, probe_ts = [], []
    dumps, topic = orjson.dumps, settings["topic"]
    started = time.time()
    behind = 0.0
    for s in range(0, n, per_slice):
        due = started + (s / per_slice) * slice_s
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        else:
            behind = max(behind, -wait)
        for j in range(s, min(s + per_slice, n)):
            user = f"u{users[j]}"
            ts = int(time.time() * 1000)
            value = dumps({"user_id": user, "item_id": f"i{items[j]}", "event_type": EVENT_TYPES[types[j]], "ts": ts})
            produce_waiting(producer, topic, value, user.encode())
            if j % probe_every == 0:
                probe_users.append(users[j])
                probe_ts.append(ts)
        producer.poll(0)
    producer.flush(60)
    conn.send({"produced": n, "started_ms": started * 1000, "seconds": time.time() - started,
               "max_behind_s": behind, "probe_users": np.array(probe_users, dtype=np.int64),
               "probe_ts": np.array(probe_ts, dtype=np.int64)})


def output_consumer_child(conn, ready, stop, received, settings: dict) -> None:
    """An independent reader of the output topic: (user, last_event_ts, receive time, produce time)."""
    consumer = Consumer({"bootstrap.servers": settings["bootstrap"], "group.id": f"scale-reader-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "session.timeout.ms": 2000, "heartbeat.interval.ms": 300,
                         "fetch.queue.backoff.ms": 10, "queued.min.messages": 1_000_000,
                         "fetch.wait.max.ms": 10})
    consumer.subscribe([settings["topic"]], on_assign=lambda c, p: ready.set())
    users, last_ts, recv_ms, create_ms = [], [], [], []
    loads = orjson.loads
    while not stop.is_set():
        messages = consumer.consume(10_000, 0.05)
        now = time.time() * 1000
        for m in messages:
            if m.error() is not None:
                if m.error().code() != KafkaError._PARTITION_EOF:
                    logging.warning("output reader: %s", m.error())
                continue
            value = loads(m.value())
            users.append(int(value["user_id"][1:]))  # the generator's ids: "u<number>"
            last_ts.append(value["last_event_ts"])
            recv_ms.append(now)
            create_ms.append(m.timestamp()[1])
        received.value = len(users)
    consumer.close()
    conn.send({"users": np.array(users, dtype=np.int64), "last_event_ts": np.array(last_ts, dtype=np.int64),
               "recv_ms": np.array(recv_ms, dtype=np.float64), "create_ms": np.array(create_ms, dtype=np.int64)})


# -- pure logic -------------------------------------------------------------------------------

def probe_latencies(probe_users: np.ndarray, probe_ts: np.ndarray, out_users: np.ndarray,
                    out_last_ts: np.ndarray, out_recv_ms: np.ndarray) -> np.ndarray:
    """Per probe: receive time of the first output for its user with ``last_event_ts >= probe ts``,
    minus the probe's ts (ms); NaN where no output covers it.

    >>> probe_latencies(np.array([1, 1, 2]), np.array([100, 200, 100]),
    ...                 np.array([1, 1, 3]), np.array([150, 210, 500]), np.array([160.0, 230.0, 510.0])).tolist()
    [60.0, 30.0, nan]
    """
    order = np.lexsort((out_recv_ms, out_users))
    users, last_ts, recv = out_users[order], out_last_ts[order], out_recv_ms[order]
    starts = np.searchsorted(users, probe_users, side="left")
    ends = np.searchsorted(users, probe_users, side="right")
    out = np.full(len(probe_users), np.nan)
    for n, (a, b, ts) in enumerate(zip(starts.tolist(), ends.tolist(), probe_ts.tolist())):
        if a == b:
            continue
        # In receive order, the running maximum of last_event_ts first reaches ts at the first record covering it.
        covered = np.maximum.accumulate(last_ts[a:b])
        j = int(np.searchsorted(covered, ts, side="left"))
        if j < b - a:
            out[n] = recv[a + j] - ts
    return out


def percentiles(values: np.ndarray) -> dict:
    values = values[np.isfinite(values)]
    if not len(values):
        return {"n": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"n": int(len(values)), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(values.max())}


def window_rates(timeline: list[tuple[float, int, int]], t0: float, t1: float) -> dict:
    """Events/s inside [t0, t1] and outside it, from the first applied batch to the end (interpolated)."""
    points = [(t, e) for t, e, _ in timeline]
    first = next(i for i, (_, e) in enumerate(points) if e > 0)
    ts = np.array([t for t, _ in points[first:]])
    es = np.array([e for _, e in points[first:]], dtype=np.float64)
    t0, t1 = max(t0, ts[0]), min(t1, ts[-1])
    if t1 <= t0:
        return {"inside_s": 0.0}
    inside_n = np.interp(t1, ts, es) - np.interp(t0, ts, es)
    outside_s = (ts[-1] - ts[0]) - (t1 - t0)
    outside_n = (es[-1] - es[0]) - inside_n
    return {"inside_s": float(t1 - t0), "outside_s": float(outside_s), "inside_events_per_s": float(inside_n / (t1 - t0)),
            "outside_events_per_s": float(outside_n / outside_s) if outside_s > 0 else float("nan")}


# -- orchestration ----------------------------------------------------------------------------

def run_child(target, *args, timeout_s: float) -> dict:
    receive, send = SPAWN.Pipe(duplex=False)
    process = SPAWN.Process(target=target, args=(send, *args))
    process.start()
    print(f"{target.__name__}: pid {process.pid}", file=sys.stderr, flush=True)  # for py-spy
    send.close()
    if not receive.poll(timeout_s):
        process.kill()
        raise RuntimeError(f"{target.__name__} sent nothing within {timeout_s:.0f}s")
    result = receive.recv()
    process.join()
    return result


def catch_up(bootstrap: str, topic: str, n: int, publish: bool, timeout_s: float, during=None, **extra) -> dict:
    """One catch-up run in a child; ``during(progress)`` runs in a thread of this process meanwhile."""
    output = f"{topic}-recs-{uuid.uuid4().hex[:6]}"
    create_topics(bootstrap, {output: 4, f"{topic}.dlq": 1})
    progress = SPAWN.Value("q", 0)
    side: dict = {}
    thread = None
    if during is not None:
        thread = threading.Thread(target=lambda: side.update(during(progress)), daemon=True)
        thread.start()
    settings = {"bootstrap": bootstrap, "topic": topic, "output": output, "events": n, "publish": publish,
                "timeout_s": timeout_s, "overrides": OVERRIDES, **extra}
    result = run_child(catch_up_child, progress, settings, timeout_s=timeout_s + 600)
    if thread is not None:
        thread.join()
        result["during"] = side
    result["output_per_event"] = result["updates_published"] / max(result["events_applied"], 1)
    return result


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    started = time.perf_counter()
    produce_all(bootstrap, topic, messages)
    return len(messages) / (time.perf_counter() - started)


def live_phase(bootstrap: str, state_dir: str, events_path: str, args) -> dict:
    tag = uuid.uuid4().hex[:6]
    topic, output = f"scale-live-{tag}", f"scale-live-{tag}-recs"
    create_topics(bootstrap, {topic: args.partitions, output: 4, f"{topic}.dlq": 1})
    probe_every = max(1, round(1 / args.probe_fraction))
    stop_reader, stop_service = SPAWN.Event(), SPAWN.Event()
    reader_ready, service_ready = SPAWN.Event(), SPAWN.Event()
    received, applied = SPAWN.Value("q", 0), SPAWN.Value("q", 0)
    pipes = {name: SPAWN.Pipe(duplex=False) for name in ("reader", "service", "producer")}
    reader = SPAWN.Process(target=output_consumer_child, args=(pipes["reader"][1], reader_ready, stop_reader, received,
                                                               {"bootstrap": bootstrap, "topic": output}))
    service = SPAWN.Process(target=live_service_child, args=(pipes["service"][1], applied, service_ready, stop_service,
                                                             {"bootstrap": bootstrap, "topic": topic, "output": output,
                                                              "state_dir": state_dir, "overrides": OVERRIDES,
                                                              "log_rounds": getattr(args, "log_rounds", False)}))
    reader.start()
    service.start()
    print(f"live service: pid {service.pid}", file=sys.stderr, flush=True)
    if not (reader_ready.wait(120) and service_ready.wait(600)):
        raise RuntimeError("the live service or the output reader did not start")
    producer = SPAWN.Process(target=live_producer_child, args=(pipes["producer"][1], {
        "bootstrap": bootstrap, "topic": topic, "events_path": events_path, "rate": args.live_rate,
        "probe_every": probe_every}))
    producer.start()
    produced = pipes["producer"][0].recv()
    producer.join()
    # Grace: until the service has applied everything produced (or --live-grace s), then two flush intervals.
    deadline = time.time() + args.live_grace
    while applied.value < produced["produced"] and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)
    stop_service.set()
    served = pipes["service"][0].recv()
    service.join()
    deadline = time.time() + 60
    while received.value < served["updates_published"] and time.time() < deadline:
        time.sleep(0.1)
    stop_reader.set()
    read = pipes["reader"][0].recv()
    reader.join()

    latencies = probe_latencies(produced["probe_users"], produced["probe_ts"], read["users"],
                                read["last_event_ts"], read["recv_ms"])
    warm = produced["probe_ts"] < produced["started_ms"] + WARMUP_S * 1000
    delay = read["recv_ms"] - read["create_ms"]  # output produced by the service -> received by the reader
    last = read["recv_ms"] >= read["recv_ms"].max() - 10_000 if len(delay) else np.zeros(0, dtype=bool)
    return {
        "rate": args.live_rate, "seconds": args.live_seconds, "grace_s": args.live_grace, "produced": produced["produced"],
        "producer_seconds": produced["seconds"], "producer_max_behind_s": produced["max_behind_s"],
        "probes": int(len(latencies)), "warmup_s": WARMUP_S,
        "latency_ms": percentiles(latencies[~warm]), "latency_ms_warmup": percentiles(latencies[warm]),
        "unmatched": int(np.isnan(latencies[~warm]).sum()), "unmatched_warmup": int(np.isnan(latencies[warm]).sum()),
        "applied_by_stop": served["events_applied"],
        "service": {k: v for k, v in served.items() if k != "timeline"},
        "reader": {"received": int(len(read["users"])), "published": served["updates_published"],
                   "behind_at_end": served["updates_published"] - int(len(read["users"])),
                   "delivery_delay_ms": percentiles(delay), "delivery_delay_ms_last_10s": percentiles(delay[last])},
    }


def time_build(points_path: str, n_trees: int, timeout_s: float) -> dict:
    points = np.load(points_path)
    with tempfile.TemporaryDirectory(prefix="scale-annoy-") as tmp:
        started = time.time()
        build_in_subprocess(points, Path(tmp) / "items.ann", n_trees, timeout_s)
        ended = time.time()
    return {"items": int(len(points)), "n_trees": n_trees, "started": started, "ended": ended,
            "seconds": ended - started}


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip() != ""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_at_start": os.getloadavg(), "commit": commit, "uncommitted_changes": dirty}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(result: dict) -> str:
    a, w = result["catch_up"], result["workload"]
    rows = [
        ("(a) catch-up, no publishing, total", f"{a['no_publish']['events_per_s']:,.0f} events/s"),
        ("(a) catch-up, no publishing, steady", f"{a['no_publish']['steady_events_per_s']:,.0f} events/s"),
        ("(a) catch-up, publishing, total", f"{a['publish']['events_per_s']:,.0f} events/s"),
        ("(a) catch-up, publishing, steady", f"{a['publish']['steady_events_per_s']:,.0f} events/s"),
        ("(a) publishing / no publishing, steady", f"{a['publish_ratio_steady']:.2f}"),
        ("(a) output messages per event (publishing)", f"{a['publish']['output_per_event']:.2f}"),
    ]
    index = result["runs"]["publish"][0].get("index")
    if index:
        rows.append(("(a) publishing flushes scoring all items exactly (no index yet, or >= half the items changed since it) / with no index",
                     f"{index['flush_share_exact_all']:.2f} / {index['flush_share_without_index']:.2f} "
                     f"(first index after {index['first_index_s'] or float('nan'):.0f} s)"))
    if not a["all_finished"]:
        rows.append(("(a) WARNING", "a run hit --phase-timeout: rates are over the events it applied"))
    live = result.get("live")
    if live:
        lat = live["latency_ms"]
        rows += [
            (f"(b) freshness at {live['rate']:,} events/s for {live['seconds']} s, p50 / p95 / p99 / max",
             " / ".join(f"{lat[q]:,.0f}" for q in ("p50", "p95", "p99", "max")) + " ms" if lat["n"] else "no probes"),
            ("(b) probes matched / unmatched (after the warm-up)", f"{lat['n']:,} / {live['unmatched']:,}"),
            (f"(b) warm-up (first {live['warmup_s']:.0f} s) p50 / max, unmatched",
             (f"{live['latency_ms_warmup']['p50']:,.0f} / {live['latency_ms_warmup']['max']:,.0f} ms"
              if live["latency_ms_warmup"]["n"] else "-") + f", {live['unmatched_warmup']}"),
            (f"(b) live events applied when stopped ({live['grace_s']:.0f} s grace after the producer)",
             f"{live['applied_by_stop']:,} of {live['produced']:,}"),
            ("(b) output reader behind at the end (messages)", f"{live['reader']['behind_at_end']:,}"),
        ]
    rec = result.get("recall")
    if rec:
        rows += [(f"(c) recall@10 of published lists vs exact ({rec['users']:,} users)", f"{rec['recall_at_10']:.4f}"),
                 ("(c) share of the exact top-10 served by the index (items unchanged since its build)",
                  f"{rec['exact_top_share_from_index']:.3f}"),
                 ("(c) recall@10 of the Annoy index alone (default search_k) vs exact over its own vectors",
                  f"{rec['index_alone_recall_at_10']:.4f}" if rec.get("index_alone_recall_at_10") is not None else "no index"),
                 ("(c) brute force / service, ms per user",
                  f"{rec['brute_force_ms_per_user']:.2f} / {rec['service_ms_per_user']:.2f}")]
    m = result["memory"]
    rows += [
        ("(d) users / items in the model", f"{m['users']:,} / {m['items']:,}"),
        ("(d) peak RSS: no publishing / publishing / live",
         " / ".join(f"{m[k] / 2**20:,.0f}" for k in ("peak_rss_no_publish", "peak_rss_publish", "peak_rss_live")) + " MiB"),
        ("(d) model arrays, bytes per user / per item",
         f"{m['array_bytes_per_user']:,.0f} / {m['array_bytes_per_item']:,.0f}"),
        ("(d) RSS growth (no publishing) per user / per (user + item)",
         f"{m['rss_growth_per_user']:,.0f} / {m['rss_growth_per_id']:,.0f} bytes"),
    ]
    e = result.get("annoy")
    if e:
        rows.append((f"(e) Annoy build, {e['build']['items']:,} items, {e['build']['n_trees']} trees",
                     f"{e['build']['seconds']:.1f} s"))
        c = e["concurrent"]
        if c.get("inside_s"):
            rows.append((f"(e) consumer during a build / outside ({c['inside_s']:.0f} s / {c['outside_s']:.0f} s)",
                         f"{c['inside_events_per_s']:,.0f} / {c['outside_events_per_s']:,.0f} events/s "
                         f"({c['inside_events_per_s'] / c['outside_events_per_s']:.2f})"))
    head = (f"| measure ({w['users']:,} users, {w['items']:,} items, {w['events']:,} events, "
            f"{w['partitions']} partitions; median of {result['repeats']}) | value |\n|---|---:|")
    return head + "\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def live_only(bootstrap: str, topic: str, state_dir: str, live_path: str, args, out: Path, info: dict,
              say: Callable[[str], None]) -> None:
    """``--live-only``: a catch-up without publishing (its state saved), then the live phase."""
    catch = catch_up(bootstrap, topic, args.events, False, args.phase_timeout, save_state_dir=state_dir)
    say(f"catch-up without publishing {catch['steady_events_per_s']:,.0f}/s steady")
    live = live_phase(bootstrap, state_dir, live_path, args)
    catch["flushes"] = len(catch.pop("timeline"))
    lat, warm = live["latency_ms"], live["latency_ms_warmup"]
    say(f"live {args.live_rate:,}/s for {args.live_seconds}s: freshness p50 / p95 / p99 / max "
        f"{lat['p50']:,.0f} / {lat['p95']:,.0f} / {lat['p99']:,.0f} / {lat['max']:,.0f} ms (warm-up p50 "
        f"{warm['p50']:,.0f} ms); applied {live['applied_by_stop']:,} of {live['produced']:,}; "
        f"{live['service']['checkpoints']} checkpoints, {live['service']['index_builds']} index builds")
    result = {"command": " ".join([sys.executable, *sys.argv]), "machine": info, "settings": OVERRIDES,
              "workload": {"users": args.users, "items": args.items, "events": args.events,
                           "partitions": args.partitions, "seed": args.seed},
              "catch_up_no_publish": catch, "live": live}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"written to {out} (commit {info['commit'][:10]}{', with uncommitted changes' if info['uncommitted_changes'] else ''})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--live-rate", type=int, default=20_000, help="events/s produced in the live phase")
    parser.add_argument("--live-seconds", type=int, default=60)
    parser.add_argument("--live-grace", type=float, default=60,
                        help="after the producer ends, wait this long at most for the service to apply everything")
    parser.add_argument("--probe-fraction", type=float, default=0.01, help="share of live events that are probes")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--recall-users", type=int, default=2000)
    parser.add_argument("--phase-timeout", type=float, default=900,
                        help="stop a catch-up run after this many s (its rates are then over what it applied)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--live-only", action="store_true",
                        help="only a catch-up without publishing (for the state) and the live phase")
    parser.add_argument("--log-rounds", action="store_true",
                        help="the live service logs each publishing round (users, seconds) to stderr")
    parser.add_argument("--quick", action="store_true",
                        help="100k users and items, 300k events, 15 s live (a smoke test of a few minutes)")
    parser.add_argument("--out", default=None, help="default bench/results/scale.json (scale-quick.json with --quick)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a service setting for every phase, e.g. output.flush_interval_s=0.25")
    args = parser.parse_args()
    if args.quick:
        defaults = {"users": 1_000_000, "items": 1_000_000, "events": 2_000_000, "live_seconds": 60}
        quick = {"users": 100_000, "items": 100_000, "events": 300_000, "live_seconds": 15}
        for key, value in quick.items():  # flags given explicitly still win
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    default_out = "scale-quick.json" if args.quick else "scale.json"
    if args.live_only:
        default_out = f"scale-live-{args.live_rate // 1000}k{'-quick' if args.quick else ''}.json"
    out = Path(args.out or f"bench/results/{default_out}")
    OVERRIDES.update(setting.split("=", 1) for setting in args.set)
    load_config(overrides=OVERRIDES)  # a bad --set stops here, naming the setting
    logging.basicConfig(level=logging.WARNING)
    info = machine()

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    live_n = args.live_rate * args.live_seconds
    now_ms = int(time.time() * 1000)
    # One stream: the catch-up part ends about now (1 event per ms), the live part continues it.
    gen = SyntheticClickstream(n_users=args.users, n_items=args.items, seed=args.seed, zipf_exponent=1.0,
                               user_zipf_exponent=0.8, start_ms=now_ms - args.events)
    started = time.time()
    events = gen.events(args.events + live_n)
    catch_users = events.users[: args.events]
    messages = SyntheticEvents(events.users[: args.events], events.items[: args.events],
                               events.event_types[: args.events], events.ts[: args.events]).messages()
    say(f"generated {args.events:,} + {live_n:,} events in {time.time() - started:.0f}s: "
        f"{len(np.unique(catch_users)):,} users, {len(np.unique(events.items[: args.events])):,} items in the catch-up")

    with tempfile.TemporaryDirectory(prefix="scale-") as tmp, EmbeddedBroker() as bootstrap:
        live_path, stream_users_path = f"{tmp}/live.npz", f"{tmp}/stream-users.npy"
        np.save(stream_users_path, catch_users)
        np.savez(live_path, users=events.users[args.events:], items=events.items[args.events:],
                 event_types=events.event_types[args.events:])
        topic = f"scale-{uuid.uuid4().hex[:6]}"
        create_topics(bootstrap, {topic: args.partitions})
        produce_rate = produce(bootstrap, topic, messages)
        del messages
        say(f"pre-produced {args.events:,} events at {produce_rate:,.0f}/s")

        runs: dict[str, list[dict]] = {"no_publish": [], "publish": []}
        state_dir, points_path = f"{tmp}/state", f"{tmp}/points.npy"
        if args.live_only:
            live_only(bootstrap, topic, state_dir, live_path, args, out, info, say)
            return
        for r in range(args.repeats):
            runs["no_publish"].append(catch_up(bootstrap, topic, args.events, False, args.phase_timeout))
            say(f"run {r + 1}: no publishing {runs['no_publish'][-1]['events_per_s']:,.0f}/s total, "
                f"{runs['no_publish'][-1]['steady_events_per_s']:,.0f}/s steady")
            extra = {"recall_users": args.recall_users, "stream_users_path": stream_users_path, "seed": args.seed,
                     "save_state_dir": state_dir, "points_path": points_path} if r == 0 else {}
            runs["publish"].append(catch_up(bootstrap, topic, args.events, True, args.phase_timeout, **extra))
            say(f"run {r + 1}: publishing {runs['publish'][-1]['events_per_s']:,.0f}/s total, "
                f"{runs['publish'][-1]['steady_events_per_s']:,.0f}/s steady, "
                f"{runs['publish'][-1]['output_per_event']:.2f} outputs/event")
        first_publish = runs["publish"][0]
        say(f"recall@10 {first_publish['recall']['recall_at_10']:.4f} over {first_publish['recall']['users']} users")

        n_trees = load_config().index.n_trees
        build = time_build(points_path, n_trees, args.phase_timeout)
        say(f"Annoy build of {build['items']:,} items: {build['seconds']:.1f}s")

        def build_after_a_third(progress) -> dict:
            while progress.value < args.events // 3:
                time.sleep(0.02)
            return time_build(points_path, n_trees, args.phase_timeout)

        concurrent = catch_up(bootstrap, topic, args.events, False, args.phase_timeout, during=build_after_a_third)
        window = window_rates(concurrent["timeline"], concurrent["during"]["started"], concurrent["during"]["ended"])
        say(f"consumer during a build {window.get('inside_events_per_s', float('nan')):,.0f}/s, "
            f"outside {window.get('outside_events_per_s', float('nan')):,.0f}/s")

        live = live_phase(bootstrap, state_dir, live_path, args)
        say(f"live: p50 {live['latency_ms'].get('p50', float('nan')):,.0f} ms, "
            f"p99 {live['latency_ms'].get('p99', float('nan')):,.0f} ms, unmatched {live['unmatched']}")

    no_pub, pub = runs["no_publish"], runs["publish"]
    catch = {
        "no_publish": {k: median_of(no_pub, k) for k in ("events_per_s", "steady_events_per_s", "seconds")},
        "publish": {k: median_of(pub, k) for k in ("events_per_s", "steady_events_per_s", "seconds", "output_per_event")},
        "all_finished": all(r["finished"] for r in no_pub + pub),
    }
    catch["publish_ratio_total"] = catch["publish"]["events_per_s"] / catch["no_publish"]["events_per_s"]
    catch["publish_ratio_steady"] = catch["publish"]["steady_events_per_s"] / catch["no_publish"]["steady_events_per_s"]
    base = no_pub[0]
    growth = base["peak_rss"] - base["baseline_rss"]
    memory = {
        "users": base["users"], "items": base["items"],
        "array_bytes_per_user": base["array_bytes_per_user"], "array_bytes_per_item": base["array_bytes_per_item"],
        "baseline_rss": base["baseline_rss"], "peak_rss_no_publish": base["peak_rss"],
        "peak_rss_publish": first_publish["peak_rss"], "peak_rss_live": live["service"]["peak_rss"],
        "rss_growth_no_publish": growth, "rss_growth_per_user": growth / base["users"],
        "rss_growth_per_id": growth / (base["users"] + base["items"]),
    }
    for run in no_pub + pub + [concurrent]:  # the raw timelines are long: keep their length only
        run["flushes"] = len(run.pop("timeline"))
    result = {
        "command": " ".join([sys.executable, *sys.argv]), "machine": info,
        "load_average_at_end": os.getloadavg(), "repeats": args.repeats,
        "settings": OVERRIDES,
        "workload": {"users": args.users, "items": args.items, "events": args.events, "partitions": args.partitions,
                     "user_zipf": 0.8, "item_zipf": 1.0, "ids": "strings u<n>, i<n>", "seed": args.seed,
                     "pre_produce_events_per_s": produce_rate},
        "catch_up": catch, "recall": first_publish["recall"], "memory": memory, "live": live,
        "annoy": {"build": build, "concurrent": window, "concurrent_run": concurrent},
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print()
    print(table(result))
    print(f"\nwritten to {out} (commit {info['commit'][:10]}{', with uncommitted changes' if info['uncommitted_changes'] else ''})")


if __name__ == "__main__":
    main()
