"""One consumer group, one member against two, on the embedded broker, in one invocation.

Workload: the clickstream of ``bench/scale.py`` (``--users`` users with Zipf 0.8 activity,
``--items`` items with Zipf 1.0 popularity, string ids), ``--events`` events pre-produced to a
``--partitions``-partition topic. The group's sync topic exists, so members share item state
(``sync.mode`` auto) in both runs; publishing is off (the learning path and the sync are measured).

For one member, then two members (each its own process, started together, one group): the
group's events/s from the start to the moment the members together applied every event ("total")
and from the first applied batch ("steady"), the ratio of two to one, each member's CPU time per
event applied (what sizes a bigger machine: members on cores of their own scale until the broker
or the network is the limit), the item deltas sent and received, and how far the two members'
item vectors agree once the last deltas are in (cosine for items with 20+ events in the stream).

    python bench/members.py [--quick] [--users N --items N --events N --partitions N --repeats R --out PATH]
                            [--set SECTION.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from recstream.stream.broker import EmbeddedBroker, create_topics, produce_all
from recstream.stream.config import load_config, sync_topic_for
from recstream.stream.service import RecStreamService
from recstream.stream.synthetic import SyntheticClickstream, SyntheticEvents

SPAWN = mp.get_context("spawn")
FAST_JOIN = {"kafka.consumer.session.timeout.ms": "3000", "kafka.consumer.heartbeat.interval.ms": "300"}
SYNC_INTERVAL_S = 5.0  # the default


def member_child(conn, progress, stop, settings: dict) -> None:
    """One member until ``stop``; sends back its timeline, CPU time and item vectors."""
    logging.basicConfig(level=logging.WARNING)
    config = load_config(overrides={
        "kafka.bootstrap.servers": settings["bootstrap"], **FAST_JOIN, "topics.input": settings["topic"],
        "topics.output": settings["output"], "topics.dead_letter": f"{settings['topic']}.dlq",
        "topics.group_id": settings["group"], "output.publish": False, "sync.member": settings["member"],
        "sync.interval_s": SYNC_INTERVAL_S, **settings.get("overrides", {})})
    timeline: list[tuple[float, int]] = []

    def on_flush(service: RecStreamService) -> None:
        timeline.append((time.time(), service.stats.events_applied))
        progress.value = service.stats.events_applied

    service = RecStreamService(config, on_flush=on_flush)
    threading.Thread(target=lambda: (stop.wait(), service.stop.set()), daemon=True).start()
    cpu = time.process_time()
    service.run()
    cpu = time.process_time() - cpu
    model = service.model
    counts = model.interaction_counts(np.arange(len(model.items)))
    kept = np.flatnonzero(counts >= 20)
    conn.send({"member": settings["member"], "pid": os.getpid(), "timeline": timeline,
               "events_applied": service.stats.events_applied, "cpu_s": cpu,
               "sync_items_sent": service.stats.sync_items_sent, "sync_items_received": service.stats.sync_items_received,
               "sync_clicks_sent": service.stats.sync_clicks_sent,
               "sync_clicks_received": service.stats.sync_clicks_received,
               "items": model.items.ids.ids_of(kept.tolist()), "vectors": model.items.vectors[kept].copy()})


def run_group(bootstrap: str, topic: str, n_events: int, members: int, timeout_s: float,
              overrides: dict | None = None) -> dict:
    """``members`` members of a new group consume the topic; stopped once together they applied it all
    and two sync intervals passed (so that each holds the other's last deltas)."""
    group = f"members-{uuid.uuid4().hex[:8]}"
    output = f"{topic}-recs-{uuid.uuid4().hex[:6]}"
    create_topics(bootstrap, {output: 4, f"{topic}.dlq": 1, sync_topic_for(group): 1})
    stop = SPAWN.Event()
    children = []
    started = time.time()
    for m in range(members):
        receive, send = SPAWN.Pipe(duplex=False)
        progress = SPAWN.Value("q", 0)
        settings = {"bootstrap": bootstrap, "topic": topic, "output": output, "group": group, "member": f"m{m}",
                    "overrides": overrides or {}}
        process = SPAWN.Process(target=member_child, args=(send, progress, stop, settings))
        process.start()
        send.close()
        children.append((process, receive, progress))
    deadline = started + timeout_s
    while sum(p.value for _, _, p in children) < n_events and time.time() < deadline:
        time.sleep(0.05)
    done_at = time.time()
    time.sleep(2 * SYNC_INTERVAL_S + 1)
    stop.set()
    results = []
    for process, receive, _ in children:
        if not receive.poll(300):
            process.kill()
            raise RuntimeError("a member sent nothing within 300 s of its stop")
        results.append(receive.recv())
        process.join()
    applied = sum(r["events_applied"] for r in results)
    first = min(next(t for t, e in r["timeline"] if e > 0) for r in results)
    out = {
        "members": members, "events_applied": applied, "finished": applied >= n_events,
        "seconds": done_at - started, "events_per_s": applied / (done_at - started),
        "steady_events_per_s": applied / (done_at - first), "first_batch_s": first - started,
        "cpu_us_per_event": [1e6 * r["cpu_s"] / max(r["events_applied"], 1) for r in results],
        "events_per_member": [r["events_applied"] for r in results],
        "sync_items_sent": [r["sync_items_sent"] for r in results],
        "sync_items_received": [r["sync_items_received"] for r in results],
        "sync_clicks_sent": [r["sync_clicks_sent"] for r in results],
        "sync_clicks_received": [r["sync_clicks_received"] for r in results],
    }
    if members == 2:
        out["agreement"] = agreement(results[0], results[1])
    return out


def agreement(a: dict, b: dict) -> dict:
    """Cosine of the two members' vectors for the items both count 20+ events on."""
    where = {key: n for n, key in enumerate(b["items"])}
    pairs = [(n, where[key]) for n, key in enumerate(a["items"]) if key in where]
    if not pairs:
        return {"items": 0}
    x = a["vectors"][[i for i, _ in pairs]]
    y = b["vectors"][[j for _, j in pairs]]
    cos = (x * y).sum(axis=1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    return {"items": len(pairs), "cosine_min": float(cos.min()), "cosine_p01": float(np.quantile(cos, 0.01)),
            "cosine_median": float(np.median(cos)), "share_at_least_0_99": float(np.mean(cos >= 0.99))}


def table(result: dict) -> str:
    one, two = result["summary"]["one"], result["summary"]["two"]
    agree = result["runs"]["two"][0].get("agreement", {})
    rows = [
        "| measure | one member | two members | ratio |",
        "|---|---:|---:|---:|",
        f"| group events/s, total | {one['events_per_s']:,.0f} | {two['events_per_s']:,.0f} | "
        f"{two['events_per_s'] / one['events_per_s']:.2f} |",
        f"| group events/s, steady | {one['steady_events_per_s']:,.0f} | {two['steady_events_per_s']:,.0f} | "
        f"{two['steady_events_per_s'] / one['steady_events_per_s']:.2f} |",
        f"| CPU µs per event, per member | {one['cpu_us_per_event']:.1f} | {two['cpu_us_per_event']:.1f} | |",
        f"| item agreement: cosine min / median (items with 20+ events) | | "
        f"{agree.get('cosine_min', float('nan')):.4f} / {agree.get('cosine_median', float('nan')):.4f} "
        f"({agree.get('items', 0):,} items) | |",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="100k users, 100k items, 300k events")
    parser.add_argument("--out", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting for every member (e.g. sync.sessions=false)")
    args = parser.parse_args()
    if args.quick:
        args.users, args.items, args.events = 100_000, 100_000, 300_000
    out = Path(args.out or ("bench/results/members-quick.json" if args.quick else "bench/results/members.json"))
    logging.basicConfig(level=logging.WARNING)
    overrides = dict(item.split("=", 1) for item in args.set)

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    gen = SyntheticClickstream(n_users=args.users, n_items=args.items, seed=args.seed, zipf_exponent=1.0,
                               user_zipf_exponent=0.8, start_ms=int(time.time() * 1000) - args.events)
    events = gen.events(args.events)
    messages = SyntheticEvents(events.users, events.items, events.event_types, events.ts).messages()
    runs: dict[str, list[dict]] = {"one": [], "two": []}
    with EmbeddedBroker() as bootstrap:
        topic = f"members-{uuid.uuid4().hex[:6]}"
        create_topics(bootstrap, {topic: args.partitions})
        produce_all(bootstrap, topic, messages)
        del messages
        say(f"pre-produced {args.events:,} events to {args.partitions} partitions")
        for r in range(args.repeats):
            for key, members in (("one", 1), ("two", 2)):
                runs[key].append(run_group(bootstrap, topic, args.events, members, args.timeout, overrides))
                run = runs[key][-1]
                say(f"run {r + 1}, {members} member(s): {run['events_per_s']:,.0f}/s total, "
                    f"{run['steady_events_per_s']:,.0f}/s steady, CPU µs/event {run['cpu_us_per_event']}, "
                    f"events per member {run['events_per_member']}")
    summary = {key: {"events_per_s": statistics.median(r["events_per_s"] for r in rs),
                     "steady_events_per_s": statistics.median(r["steady_events_per_s"] for r in rs),
                     "cpu_us_per_event": statistics.median(c for r in rs for c in r["cpu_us_per_event"])}
               for key, rs in runs.items()}
    summary["ratio_total"] = summary["two"]["events_per_s"] / summary["one"]["events_per_s"]
    summary["ratio_steady"] = summary["two"]["steady_events_per_s"] / summary["one"]["steady_events_per_s"]
    result = {"args": vars(args), "settings": overrides, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "sync_interval_s": SYNC_INTERVAL_S, "runs": runs, "summary": summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"ratio two/one: total {summary['ratio_total']:.2f}, steady {summary['ratio_steady']:.2f} -> {out}")


if __name__ == "__main__":
    sys.exit(main())
