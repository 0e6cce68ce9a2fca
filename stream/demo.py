"""``recstream demo``: the whole pipeline on one machine, watched live.

An embedded broker, a generator of synthetic clicks with planted and
drifting tastes, the real consumer service, and a reader of the output topic
whose recommendations are printed beside each watched user's true favourite
genres, so a person can see whether they make sense.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import orjson
from confluent_kafka import Consumer, Producer
from recstream.stream.broker import EmbeddedBroker, create_topics, produce_waiting
from recstream.stream.config import HttpConfig, load_config
from recstream.stream.service import RecStreamService
from recstream.stream.synthetic import GENRES, SyntheticClickstream
from recstream.stream.web import ServiceHttp

# Short group timeouts: the embedded broker joins a group in about half of session.timeout.ms.
DEMO_KAFKA = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500", "max.poll.interval.ms": "60000"}
WATCHED_USERS = 3


def _generate(bootstrap: str, gen: SyntheticClickstream, rate: float, stop: threading.Event, counts: dict) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    tick = 0.1
    started = time.monotonic()
    rng = np.random.default_rng(7)
    while not stop.is_set():
        for key, value in gen.events(max(1, int(rate * tick))).messages():
            if rng.random() < 0.001:  # a few broken messages, to show the dead-letter topic at work
                value = value[: len(value) // 2]
            produce_waiting(producer, "clicks", value, key)
            counts["produced"] += 1
        producer.poll(0)
        time.sleep(max(0.0, started + counts["produced"] / rate - time.monotonic()))
    producer.flush(10)


def _read_updates(bootstrap: str, watched: set[str], stop: threading.Event, latest: dict) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "recstream-demo-reader",
                         "auto.offset.reset": "earliest", **DEMO_KAFKA})
    consumer.subscribe(["recs"])
    try:
        while not stop.is_set():
            for m in consumer.consume(1000, 0.2):
                if m.error() is None:
                    latest["count"] += 1
                    if m.key() and m.key().decode() in watched:
                        latest[m.key().decode()] = orjson.loads(m.value())
    finally:
        consumer.close()


def _taste(gen: SyntheticClickstream, user: int) -> str:
    top = np.argsort(-gen.tastes[user])[:3]
    return ", ".join(f"{GENRES[g]} {gen.tastes[user, g]:.0%}" for g in top if gen.tastes[user, g] >= 0.05)


def _print_status(service: RecStreamService, gen: SyntheticClickstream, watched: list[int], latest: dict,
                  counts: dict, elapsed: float, rate: float) -> None:
    s = service.stats
    index = service.refresher.current
    lines = [
        "",
        f"== recstream demo  t={elapsed:5.0f}s  produced={counts['produced']:,}  applied={s.events_applied:,} "
        f"({rate:,.0f} events/s)  dead letters={s.dead_letters}",
        f"   users={len(service.model.users):,}  items={len(service.model.items):,}  model v{service.model.model_version}"
        f"  index v{index.version if index else 0}"
        + (f" (built {time.monotonic() - index.built_at:.0f}s ago in {index.build_seconds:.2f}s)" if index else "")
        + f"  updates published={s.updates_published:,}  read back={latest['count']:,}  taste shifts={gen.drifts}",
    ]
    for user in watched:
        uid = f"u{user}"
        lines.append(f"   {uid}: likes {_taste(gen, user)}")
        update = latest.get(uid)
        if update is None:
            lines.append("      (no update read back yet)")
            continue
        liked = {GENRES[g] for g in np.argsort(-gen.tastes[user])[:3] if gen.tastes[user, g] >= 0.05}
        shown, matches = [], 0
        for rec in update["items"][:5]:
            genres = gen.genres_of(int(rec["item_id"][1:]))
            matches += bool(liked & set(genres))
            shown.append(f"{rec['item_id']} ({'/'.join(genres)})")
        lines.append(f"      top-5 [{matches}/5 in liked genres, model v{update['model_version']}, "
                     f"index v{update['index_version']}]: " + ", ".join(shown))
    print("\n".join(lines), flush=True)


def _start_http(service: RecStreamService, port: int) -> ServiceHttp:
    """The HTTP side on ``port``, or on any free port if that one is taken (a demo should not fail on it)."""
    try:
        return ServiceHttp(service, HttpConfig(port=port)).start()
    except OSError:
        return ServiceHttp(service, HttpConfig(port=0)).start()


def run_demo(duration_s: float = 0.0, rate: float = 20_000.0, n_users: int = 20_000, n_items: int = 5_000,
             http_port: int = 8080) -> int:
    logging.getLogger("recstream").setLevel(logging.WARNING)
    print("starting the embedded broker (tansu) ...", flush=True)
    broker = EmbeddedBroker()
    bootstrap = broker.start()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        create_topics(bootstrap, {"clicks": 4, "recs": 4, "clicks.dlq": 1})
        gen = SyntheticClickstream(n_users=n_users, n_items=n_items, seed=1, start_ms=int(time.time() * 1000),
                                   events_per_second=rate, drift_every=int(rate * 30), drift_fraction=0.2)
        watched = [int(u) for u in np.argsort(-gen.activity)[:WATCHED_USERS]]
        config = load_config(overrides={
            "kafka.bootstrap.servers": bootstrap,
            **{f"kafka.{k}": v for k, v in DEMO_KAFKA.items()},
            "index.rebuild_interval_s": 10.0,
            "output.flush_interval_s": 1.0,
        })
        service = RecStreamService(config, stop=stop)
        http = _start_http(service, http_port) if http_port else None
        counts = {"produced": 0}
        latest: dict = {"count": 0}
        threads = [
            threading.Thread(target=service.run, name="service"),
            threading.Thread(target=_generate, args=(bootstrap, gen, rate, stop, counts), name="generator"),
            threading.Thread(target=_read_updates, args=(bootstrap, {f"u{u}" for u in watched}, stop, latest),
                             name="reader"),
        ]
        for t in threads:
            t.start()
        print(f"broker on {bootstrap}; generating {rate:,.0f} events/s for {n_users:,} users and {n_items:,} items; "
              "Ctrl-C to stop", flush=True)
        if http is not None:
            print(f"live status page: {http.address}/   metrics: {http.address}/metrics   "
                  f"queries: {http.address}/recommend/u{watched[0]}  {http.address}/similar/i1", flush=True)
        started = last_t = time.monotonic()
        last_events = 0
        while not duration_s or time.monotonic() - started < duration_s:
            time.sleep(2.0)
            if not threads[0].is_alive():
                print("the service stopped unexpectedly", flush=True)
                return 1
            now = time.monotonic()
            events = service.stats.events_applied
            _print_status(service, gen, watched, latest, counts, now - started, (events - last_events) / (now - last_t))
            last_t, last_events = now, events
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        if http is not None:
            http.stop()
        broker.stop()
    print("stopped cleanly", flush=True)
    return 0
