"""Throughput on one generated stream, in one invocation:

(a) model update alone (id mapping + the batch SGD kernel), events/s;
(b) end to end through the embedded broker: consume, decode, update, commit;
    events/s from the service's start to the commit of the last event (group
    join included) and in steady state; the same with a state dir and a
    checkpoint every second (30x the default rate); (b+) the same, also publishing top-K
    updates for every user touched in each 1 s flush interval;
(c) river's ``reco.BiasedMF`` ``learn_one`` loop on the same events: the baseline.

Medians over ``--repeats`` runs; ratios against (c). Writes JSON and prints a table.

    python bench/throughput.py [--events 500000] [--repeats 3] [--out bench/results/throughput.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.stream.broker import EmbeddedBroker, create_topics, produce_all
from recstream.stream.config import load_config
from recstream.stream.service import RecStreamService
from recstream.stream.synthetic import EVENT_TYPES, SyntheticClickstream

WEIGHTS = {"view": 0.5, "click": 1.0, "purchase": 3.0}
BATCH = 10_000


def model_update(user_ids, item_ids, weights, dim) -> float:
    mf = OnlineMF(MFConfig(dim=dim))
    mf.learn(user_ids[:BATCH], item_ids[:BATCH], weights=weights[:BATCH])  # compile outside the timing
    mf = OnlineMF(MFConfig(dim=dim))
    nan = np.full(BATCH, np.nan, dtype=np.float32)
    started = time.perf_counter()
    for s in range(0, len(user_ids), BATCH):
        users, items = mf.users.rows(user_ids[s:s + BATCH]), mf.items.rows(item_ids[s:s + BATCH])
        mf.learn_rows(users, items, nan[: len(users)], weights[s:s + BATCH])
    return len(user_ids) / (time.perf_counter() - started)


def river_baseline(user_ids, item_ids, weights) -> float:
    from river import optim, reco

    model = reco.BiasedMF(n_factors=10, bias_optimizer=optim.SGD(0.025), latent_optimizer=optim.SGD(0.05),
                          weight_initializer=optim.initializers.Zeros(),
                          latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=73))
    ys = weights.tolist()
    started = time.perf_counter()
    for u, i, y in zip(user_ids, item_ids, ys):
        model.learn_one(u, i, y)
    return len(user_ids) / (time.perf_counter() - started)


def end_to_end(bootstrap: str, messages, dim: int, publish: bool, state_dir: str = "", attach=None,
               overrides: dict | None = None) -> dict:
    """One service run over ``messages``; ``attach(service)``, if given, is a context manager around ``run()``."""
    tag = uuid.uuid4().hex[:8]
    topics = {"input": f"bench-{tag}", "output": f"bench-recs-{tag}", "dlq": f"bench-{tag}.dlq"}
    create_topics(bootstrap, {topics["input"]: 4, topics["output"]: 4, topics["dlq"]: 1})
    produce_all(bootstrap, topics["input"], messages)
    config = load_config(overrides={
        "kafka.bootstrap.servers": bootstrap, "kafka.session.timeout.ms": "2000",
        "kafka.heartbeat.interval.ms": "300", "topics.input": topics["input"], "topics.output": topics["output"],
        "topics.dead_letter": topics["dlq"], "topics.group_id": f"bench-{tag}", "model.dim": dim,
        "output.publish": publish, "state_dir": state_dir, "checkpoint.interval_s": 1.0, **(overrides or {}),
    })
    stop = threading.Event()
    marks: dict[str, float] = {}

    def on_flush(service: RecStreamService) -> None:
        if "first" not in marks and service.stats.events_applied:
            marks["first"], marks["first_events"] = time.perf_counter(), service.stats.events_applied
        if service.stats.events_applied >= len(messages):
            marks["done"] = time.perf_counter()
            stop.set()

    service = RecStreamService(config, stop=stop, on_flush=on_flush)
    started = time.perf_counter()
    if attach is None:
        service.run()
    else:
        with attach(service):
            service.run()
    total = marks["done"] - started
    steady = (len(messages) - marks["first_events"]) / (marks["done"] - marks["first"])
    return {"events_per_s": len(messages) / total, "steady_events_per_s": steady,
            "updates_published": service.stats.updates_published, "index_builds": service.refresher.builds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--out", default="bench/results/throughput.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    gen = SyntheticClickstream(n_users=50_000, n_items=10_000, seed=0)
    events = gen.events(args.events)
    user_ids, item_ids = events.user_ids(), events.item_ids()
    weights = np.array([WEIGHTS[t] for t in EVENT_TYPES], dtype=np.float32)[events.event_types]
    messages = events.messages()

    runs: dict[str, list] = {"model_update": [], "end_to_end": [], "end_to_end_checkpointing": [],
                             "end_to_end_publishing": [], "river_biasedmf": []}
    with EmbeddedBroker() as bootstrap:
        for r in range(args.repeats):
            runs["model_update"].append(model_update(user_ids, item_ids, weights, args.dim))
            runs["river_biasedmf"].append(river_baseline(user_ids, item_ids, weights))
            runs["end_to_end"].append(end_to_end(bootstrap, messages, args.dim, publish=False))
            with tempfile.TemporaryDirectory() as state_dir:
                runs["end_to_end_checkpointing"].append(
                    end_to_end(bootstrap, messages, args.dim, publish=False, state_dir=state_dir))
            runs["end_to_end_publishing"].append(end_to_end(bootstrap, messages, args.dim, publish=True))
            print(f"run {r + 1}/{args.repeats}: update {runs['model_update'][-1]:,.0f}/s, "
                  f"end to end {runs['end_to_end'][-1]['events_per_s']:,.0f}/s, "
                  f"publishing {runs['end_to_end_publishing'][-1]['events_per_s']:,.0f}/s, "
                  f"river {runs['river_biasedmf'][-1]:,.0f}/s", flush=True)

    river = statistics.median(runs["river_biasedmf"])
    rows = {
        "(a) model update (id mapping + kernel)": statistics.median(runs["model_update"]),
        "(b) end to end, total (incl. group join)": statistics.median(r["events_per_s"] for r in runs["end_to_end"]),
        "(b) end to end, steady state": statistics.median(r["steady_events_per_s"] for r in runs["end_to_end"]),
        "(b) with a state dir, checkpoint every 1 s, steady":
            statistics.median(r["steady_events_per_s"] for r in runs["end_to_end_checkpointing"]),
        "(b+) end to end + top-10 updates published, total":
            statistics.median(r["events_per_s"] for r in runs["end_to_end_publishing"]),
        "(b+) end to end + top-10 updates published, steady":
            statistics.median(r["steady_events_per_s"] for r in runs["end_to_end_publishing"]),
        "(c) river reco.BiasedMF learn_one": river,
    }
    result = {
        "events": args.events, "repeats": args.repeats, "dim": args.dim,
        "stream": "SyntheticClickstream(n_users=50000, n_items=10000, seed=0), implicit clicks, 4 partitions",
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "median_events_per_s": rows,
        "ratio_to_river": {k: v / river for k, v in rows.items()},
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n| measure ({args.events:,} events, median of {args.repeats}) | events/s | x river |")
    print("|---|---:|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:,.0f} | {value / river:.2f} |")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
