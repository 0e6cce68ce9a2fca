"""What the HTTP side costs the consumer, and how fast it answers, in one invocation.

(a) Consumer overhead: the same stream through the service with publishing on,
    without the HTTP side and with it under load (a scraper reading /metrics
    every second and a client sending /recommend and /similar queries at
    ``--qps``), alternating, ``--repeats`` each; steady-state events/s and the
    ratio of the medians.
(b) Query latency at scale: a model of ``--items`` items (learned through
    RecState.apply, the consumer's own update path, before the service starts),
    its Annoy index built by the service's refresher before the stream starts, and the service consuming a live
    stream at ``--rate`` events/s while one client sends ``--queries``
    /recommend (and as many /similar) requests back to back; client-side
    p50/p99 over real sockets. The consumer learns without publishing (``output.publish =
    false``): publishing top-K for every touched user at 1M items holds the model lock for most
    of each flush (queries then waited over 10 s), which is the publishing path's cost, not the
    query's; ``--publish`` measures that case too.

    python bench/http_overhead.py [--events 400000] [--repeats 3] [--items 1000000]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).parent))
from recstream.stream.broker import EmbeddedBroker, create_topics, free_port, produce_waiting  # noqa: E402
from recstream.stream.config import load_config  # noqa: E402
from recstream.stream.events import EventBatch  # noqa: E402
from recstream.stream.service import RecStreamService  # noqa: E402
from recstream.stream.synthetic import SyntheticClickstream  # noqa: E402
from recstream.stream.web import ServiceHttp  # noqa: E402
from throughput import end_to_end  # noqa: E402


def _get(url: str, timeout_s: float = 10.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except TimeoutError:
        return 0


def _load(base: str, service: RecStreamService, qps: float, stop: threading.Event, counts: dict) -> None:
    """A scraper (1/s) and a query client (``qps``), until ``stop``; bounded by the run's length."""
    rng = np.random.default_rng(1)
    next_scrape = 0.0
    interval = 1.0 / qps
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_scrape:
            counts["scrapes"] += _get(base + "/metrics") == 200
            next_scrape = now + 1.0
        users, items = len(service.model.users), len(service.model.items)
        if users and items:
            counts["recommend"] += _get(f"{base}/recommend/u{int(rng.integers(users))}") in (200, 404)
            counts["similar"] += _get(f"{base}/similar/i{int(rng.integers(items))}") in (200, 404)
        stop.wait(2 * interval)


def overhead(bootstrap: str, messages, repeats: int, qps: float) -> dict:
    runs: dict[str, list] = {"without_http": [], "with_http_under_load": []}
    loads = []

    @contextmanager
    def http_under_load(service: RecStreamService):
        counts = {"scrapes": 0, "recommend": 0, "similar": 0}
        stop = threading.Event()
        with ServiceHttp(service, load_config(overrides={"http.port": free_port()}).http) as http:
            thread = threading.Thread(target=_load, args=(http.address, service, qps, stop, counts))
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join()
        loads.append(counts)

    end_to_end(bootstrap, messages[: len(messages) // 4], 32, publish=True)  # warm-up: compiles, caches
    for r in range(repeats):
        order = ["without_http", "with_http_under_load"][:: 1 if r % 2 == 0 else -1]  # alternate who goes first
        for name in order:
            runs[name].append(end_to_end(bootstrap, messages, 32, publish=True,
                                         attach=http_under_load if name == "with_http_under_load" else None))
        print(f"run {r + 1}/{repeats}: without {runs['without_http'][-1]['steady_events_per_s']:,.0f}/s, "
              f"with {runs['with_http_under_load'][-1]['steady_events_per_s']:,.0f}/s ({loads[-1]})", flush=True)
    without = statistics.median(r["steady_events_per_s"] for r in runs["without_http"])
    with_http = statistics.median(r["steady_events_per_s"] for r in runs["with_http_under_load"])
    return {"median_steady_events_per_s": {"without_http": without, "with_http_under_load": with_http},
            "ratio_with_to_without": with_http / without, "load_per_run": loads, "runs": runs}


def _pretrain(service: RecStreamService, n_users: int, n_items: int) -> float:
    """Every item gets events, through the consumer's own update path (RecState.apply)."""
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    chunk = 200_000
    total = 2 * n_items
    for s in range(0, total, chunk):
        n = min(chunk, total - s)
        items = (np.arange(s, s + n) % n_items).tolist()
        users = rng.integers(n_users, size=n).tolist()
        batch = EventBatch([f"u{u}" for u in users], [f"i{i}" for i in items], np.full(n, np.nan, np.float32),
                           np.ones(n, np.float32), np.full(n, int(time.time() * 1000), np.int64), list(range(n)))
        with service.model_lock:
            service.state.apply(batch)
    return time.perf_counter() - started


def latency(bootstrap: str, n_items: int, n_users: int, rate: float, queries: int, publish: bool) -> dict:
    tag = uuid.uuid4().hex[:8]
    topics = {"input": f"lat-{tag}", "output": f"lat-recs-{tag}", "dlq": f"lat-{tag}.dlq"}
    create_topics(bootstrap, {topics["input"]: 4, topics["output"]: 4, topics["dlq"]: 1})
    config = load_config(overrides={
        "kafka.bootstrap.servers": bootstrap, "kafka.session.timeout.ms": "6000",
        "kafka.heartbeat.interval.ms": "500", "topics.input": topics["input"], "topics.output": topics["output"],
        "topics.dead_letter": topics["dlq"], "topics.group_id": f"lat-{tag}", "http.port": free_port(),
        "output.publish": publish,
    })
    stop = threading.Event()
    service = RecStreamService(config, stop=stop)
    pretrain_s = _pretrain(service, n_users, n_items)
    print(f"pretrained {len(service.model.items):,} items, {len(service.model.users):,} users in {pretrain_s:.1f}s",
          flush=True)
    # The first index before the stream starts: without one, every flush scores all 1M items exactly
    # for every touched user, which is the publishing path's cost, not the query's.
    built = service.refresher.rebuild()
    print(f"index of {built.n_items:,} items built in {built.build_seconds:.1f}s", flush=True)
    gen = SyntheticClickstream(n_users=n_users, n_items=n_items, seed=3)
    produced = {"n": 0}

    def generate() -> None:  # the live stream while queries run
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        started = time.monotonic()
        while not stop.is_set():
            for key, value in gen.events(int(rate / 10)).messages():
                produce_waiting(producer, topics["input"], value, key)
            produced["n"] += int(rate / 10)
            producer.poll(0)
            time.sleep(max(0.0, started + produced["n"] / rate - time.monotonic()))
        producer.flush(10)

    with ServiceHttp(service) as http:
        runner = threading.Thread(target=service.run)
        runner.start()
        generator = threading.Thread(target=generate)
        generator.start()
        deadline = time.monotonic() + 900
        while _get(http.address + "/readyz") != 200:  # assigned, and the 1M-item index built
            if time.monotonic() > deadline or not runner.is_alive():
                raise RuntimeError("service not ready within 15 minutes")
            time.sleep(1.0)
        index = service.refresher.current
        print(f"ready: index v{index.version} of {index.n_items:,} items built in {index.build_seconds:.1f}s",
              flush=True)
        rng = np.random.default_rng(2)
        applied_before, t0 = service.stats.events_applied, time.monotonic()
        out = {}
        for path, prefix, n_ids in (("recommend", "u", n_users), ("similar", "i", n_items)):
            times, timeouts = [], 0
            for _ in range(queries):
                url = f"{http.address}/{path}/{prefix}{int(rng.integers(n_ids))}?k=10"
                started = time.perf_counter()
                status = _get(url)
                times.append(time.perf_counter() - started)
                timeouts += status == 0
                assert status in (0, 200), (url, status)
            ms = np.array(times) * 1000
            out[path] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                         "max_ms": float(ms.max()), "queries": queries, "timeouts_10s": timeouts}
            print(f"/{path}: p50 {out[path]['p50_ms']:.2f} ms, p99 {out[path]['p99_ms']:.2f} ms", flush=True)
        consumed = (service.stats.events_applied - applied_before) / (time.monotonic() - t0)
        stop.set()
        generator.join()
        runner.join()
    return {"items": len(service.model.items), "users": len(service.model.users), "stream_rate": rate,
            "publishing": publish,
            "events_per_s_applied_while_querying": consumed, "index_build_seconds": index.build_seconds,
            "index_items": index.n_items, "pretrain_seconds": pretrain_s, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--qps", type=float, default=50.0, help="/recommend + /similar pairs per second in (a)")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=20_000.0, help="live stream in (b), events/s")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--skip", choices=("overhead", "latency"), help="leave one part out")
    parser.add_argument("--publish", action="store_true", help="(b) with top-K publishing on")
    parser.add_argument("--out", default="bench/results/http.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result: dict = {"args": vars(args), "command": " ".join(["python", *sys.argv])}
    with EmbeddedBroker() as bootstrap:
        if args.skip != "overhead":
            messages = SyntheticClickstream(n_users=50_000, n_items=10_000, seed=0).events(args.events).messages()
            result["overhead"] = overhead(bootstrap, messages, args.repeats, args.qps)
            print(f"consumer with the HTTP side under load / without: {result['overhead']['ratio_with_to_without']:.3f}")
        if args.skip != "latency":
            result["latency"] = latency(bootstrap, args.items, args.users, args.rate, args.queries, args.publish)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
