"""The ``recstream`` command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence

from recstream.stream.config import ConfigError, ServiceConfig, load_config

log = logging.getLogger("recstream")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


def _config(args: argparse.Namespace, flags: dict[str, object]) -> ServiceConfig:
    overrides: dict[str, object] = {}
    for key, value in args.set or []:
        overrides[key] = value
    for key, value in args.X or []:
        overrides[f"kafka.{key}"] = value
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(args.config, overrides)


def _run_config(args: argparse.Namespace) -> ServiceConfig:
    config = _config(args, {
        "kafka.bootstrap.servers": args.bootstrap_servers,
        "topics.input": args.input_topic,
        "topics.output": args.output_topic,
        "topics.dead_letter": args.dlq_topic,
        "topics.group_id": args.group_id,
        "topics.start_from": args.start,
        "state_dir": args.state_dir,
        "http.port": args.http_port,
        "http.host": args.http_host,
    })
    if not config.bootstrap_servers:
        raise ConfigError("kafka.bootstrap.servers: required (--bootstrap-servers or the config file)")
    return config


def _install_stop_handlers(stop: threading.Event) -> None:
    def handle(signum: int, _frame: object) -> None:
        log.info("%s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def cmd_run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    _install_stop_handlers(stop)  # first: a signal during start-up must stop cleanly too
    from recstream.stream.service import RecStreamService

    config = _run_config(args)
    if args.create_topics:
        from recstream.stream.broker import create_topics
        from recstream.stream.logs import settings_for

        topics = config.topics
        create_topics(config.bootstrap_servers, {topics.input: args.partitions, topics.output: args.partitions,
                                                 topics.dlq: 1}, settings_for("producer", config.kafka))
    from recstream.stream.logs import StatusLog

    service = RecStreamService(config, stop=stop)
    with contextlib.ExitStack() as running:
        running.enter_context(StatusLog(service, config.loop.status_interval_s))
        if config.http.port:
            from recstream.stream.web import ServiceHttp

            running.enter_context(ServiceHttp(service))
        service.run()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from recstream.stream.checkpoint import CheckpointStore, StateDirLock
    from recstream.stream.events import EventDecoder
    from recstream.stream.replay import Progress, parse_columns, replay_file, replay_topic
    from recstream.stream.state import RecState

    config = _config(args, {"kafka.bootstrap.servers": args.bootstrap_servers, "state_dir": args.state_dir})
    if bool(args.events) == bool(args.from_topic):
        raise ConfigError("replay: give exactly one of --events PATH and --from-topic TOPIC")
    for name in ("start", "end"):
        value = getattr(args, name)
        if value not in ("earliest", "latest") and not value.isdigit():
            raise ConfigError(f"--{name}: expected earliest/latest or an epoch time in ms, got {value!r}")
    lock = StateDirLock(config.state_dir) if config.state_dir else None  # noqa: F841 (held until exit)
    store = CheckpointStore(f"{config.state_dir}/checkpoints", config.checkpoint.keep) if config.state_dir else None
    state = RecState.load_or_new(store, config.model, config.output.history_per_user)
    decoder = EventDecoder(config.events)
    progress = Progress(enabled=not args.quiet)
    if args.item_metadata:
        state.use_text_encoder(config.content.text_encoder)
        metadata = _read_item_metadata(args.item_metadata)
        ids = list(metadata)
        state.set_item_metadata(ids, [metadata[i][0] for i in ids], [metadata[i][1] for i in ids])
    if args.events:
        columns = parse_columns(args.columns) if args.columns else None
        result = replay_file(state, decoder, args.events, args.epochs, columns, args.ts_unit, progress)
    else:
        if not config.bootstrap_servers:
            raise ConfigError("kafka.bootstrap.servers: required with --from-topic")
        result = replay_topic(state, decoder, config.kafka, args.from_topic, args.start, args.end, progress)
    cold = state.refresh_cold_items(config.content.cold_count) if args.item_metadata else 0
    saved = state.save(store) if store is not None else None
    print(f"replayed {result.events_applied:,} events ({result.rejected:,} rejected) in {result.seconds:.1f}s, "
          f"{result.events_per_s:,.0f} events/s; {len(state.model.users):,} users, {len(state.model.items):,} items"
          + (f"; content vectors for {cold:,} items without events" if args.item_metadata else "")
          + (f"; checkpoint {saved}" if saved else ""))
    if result.rejected:
        print(f"rejected {result.rejected:,}: {_top_reasons(result.rejected_reasons)}")
    return 0


def _top_reasons(reasons) -> str:
    return ", ".join(f"{reason} ({n:,})" for reason, n in reasons.most_common(3))


def _load_interactions(args: argparse.Namespace, config: ServiceConfig):
    import numpy as np
    from recstream.evaluation.prequential import Interactions
    from recstream.stream.events import EventDecoder
    from recstream.stream.replay import parse_columns, read_event_log

    columns = parse_columns(args.columns) if args.columns else None
    decoder = EventDecoder(config.events)
    from collections import Counter

    from recstream.stream.metrics import reason_label

    users, items, ratings, weights, stamps, rejected = [], [], [], [], [], Counter()
    delimiter = "\t" if args.delimiter in ("tab", "\\t") else args.delimiter
    paths = args.events if isinstance(args.events, list) else [args.events]
    chunks = (chunk for path in paths for chunk in read_event_log(path, decoder, columns, args.ts_unit,
                                                                  delimiter=delimiter))
    for chunk in chunks:
        batch = chunk.batch
        rejected.update(reason_label(reason) for _, reason in chunk.bad)
        users += batch.user_ids
        items += batch.item_ids
        ratings.append(batch.ratings)
        stamps.append(batch.timestamps)
        weights.append(batch.weights if chunk.weights is None else chunk.weights)  # a mapped weight column
    data = Interactions(users, items, np.concatenate(ratings), np.concatenate(weights),
                        np.maximum(np.concatenate(stamps), 0))
    if args.order == "time":
        order = np.argsort(data.timestamps, kind="stable")  # ties keep file order
        data = Interactions([users[n] for n in order.tolist()], [items[n] for n in order.tolist()],
                            data.ratings[order], data.weights[order], data.timestamps[order])
    if args.weight_transform == "log1p":
        data.weights = np.log1p(data.weights).astype(np.float32)
    bad_weights = ~(np.isfinite(data.weights) & (data.weights > 0))
    if bad_weights.any():  # the model takes weights as relative confidences: they must be positive
        raise ConfigError(f"--columns weight: {int(bad_weights.sum())} events have a weight that is not a positive "
                          f"number (first: {data.weights[bad_weights][0]} at event {int(np.argmax(bad_weights))})")
    if args.mode == "implicit":
        data.ratings = np.full(len(data), np.nan, dtype=np.float32)  # every event is an interaction
    elif np.isnan(data.ratings).all():
        raise ConfigError("--mode explicit: the log has no ratings (map a rating column with --columns)")
    return data, rejected


def _read_item_metadata(path: str) -> dict[str, tuple[dict | None, str | None]]:
    """``{"item_id", "features", "text"}`` JSON lines (the item-metadata topic's format)."""
    from recstream.stream.metadata import parse_item_metadata

    out: dict[str, tuple[dict | None, str | None]] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item_id, features, text = parse_item_metadata(line)
            except ValueError as exc:
                raise ConfigError(f"--item-metadata: {path} line {n}: {exc}") from exc
            out[item_id] = (features, text)
    return out


def _members(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a number of members (1 or more), not {text!r}")
    return int(text)


def _sync_every(text: str) -> int:
    if text == "never":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive number of events or 'never', not {text!r}")
    return int(text)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from recstream.evaluation import prequential as ev

    config = _config(args, {})
    data, rejected = _load_interactions(args, config)
    metadata = _read_item_metadata(args.item_metadata) if args.item_metadata else None
    if args.members is not None and (args.protocol != "prequential" or metadata is not None):
        raise ConfigError("--members evaluates the prequential protocol, without --item-metadata")
    if args.protocol == "session":
        return _eval_session(args, config, data, rejected)
    results: dict[str, ev.EvalResult] = {}
    if args.members is not None:  # a consumer group simulated in one process (evaluation/members.py)
        from recstream.evaluation import members as em

        sync_every = em.DEFAULT_SYNC_EVERY if args.sync_every is None else args.sync_every
        clicks_every = em.clicks_every_for(sync_every, config.sync.interval_s, config.sync.clicks_interval_s)
        results["recstream"] = em.evaluate(data, config.model, args.mode, args.members, sync_every, config.sync.sessions,
                                           clicks_every)
        if args.baseline != "none":
            results["baseline"] = em.evaluate(data, config.model, args.mode, 1)
            baseline_name = "one process (--members 1)"
    elif args.protocol == "split":
        train, held = ev.user_split(data, args.test_fraction, seed=args.seed)
        results["recstream"] = ev.split_model(train, held, config.model, args.epochs)
        if args.baseline != "none":
            try:
                results["baseline"] = ev.split_als(train, held)
                baseline_name = "implicit ALS (64 factors, reg 30, alpha 1, 15 iterations)"
            except ImportError:
                baseline_name = "none (pip install implicit for the ALS baseline)"
    elif args.mode == "explicit":
        results["recstream"] = ev.prequential_explicit(data, config.model)
        if args.baseline != "none":
            results["baseline"] = ev.river_biasedmf(data)
            baseline_name = "river reco.BiasedMF (documented MovieLens set-up)"
    else:
        results["recstream"] = ev.prequential_implicit(data, config.model, "model", metadata,
                                                       cold_count=config.content.cold_count,
                                                       text_encoder=config.content.text_encoder)
        if metadata is not None and args.baseline != "none":
            results["baseline"] = ev.prequential_implicit(data, config.model, "model")
            baseline_name = "the same model without item metadata"
        elif args.baseline != "none":
            results["baseline"] = ev.prequential_implicit(data, config.model, "popularity")
            baseline_name = "popularity so far (river has no implicit recommender)"
    if args.baseline == "none":
        baseline_name = "none"
    out = {**results["recstream"].as_dict(), "mode": args.mode, "protocol": args.protocol,
           "epochs": args.epochs if args.protocol == "split" else 1, "rejected": sum(rejected.values()),
           "rejected_reasons": dict(rejected.most_common()),
           "events_file": " ".join(args.events), "model_config": vars(config.model) if hasattr(config.model, "__dict__")
           else {}, "baseline_name": baseline_name}
    if "baseline" in results:
        out["baseline"] = results["baseline"].as_dict()
    keys = [k for k in ("mae", "rmse", "hit_rate@10", "ndcg@10", "recall@10", "hit_rate@10_cold", "hit_rate@10_warm",
                        "events",
                        "events_per_s")
            if k in results["recstream"].metrics]
    print(f"{'metric':<17} {'recstream':>12} {'baseline':>12}   ({baseline_name})")
    for key in keys:
        mine = results["recstream"].metrics[key]
        theirs = results["baseline"].metrics.get(key) if "baseline" in results else None
        fmt = (lambda v: f"{v:12,.0f}") if key in ("events", "events_per_s") else (lambda v: f"{v:12.4f}")
        print(f"{key:<17} {fmt(mine)} {fmt(theirs) if theirs is not None else '':>12}")
    if args.members is not None:
        print(em.describe(results["recstream"].metrics))
    if rejected:
        print(f"rejected {sum(rejected.values()):,} lines: {_top_reasons(rejected)}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if args.plot:
        _plot(results, args, baseline_name)
    return 0


def _eval_session(args: argparse.Namespace, config: ServiceConfig, data, rejected: int) -> int:
    """``--protocol session``: next-click HR/MRR@20 of recstream beside popularity, SR and V-SKNN."""
    import json

    from recstream.evaluation import session as es

    results = {"recstream": es.prequential_session(data, config.model).metrics}
    if args.baseline != "none":
        for name in es.BASELINES:
            results[name] = es.prequential_baseline(data, name, config.model.session_gap_s).metrics
    keys = ("hr@20", "mrr@20", "hr@20_new", "mrr@20_new", "events_evaluated", "events_evaluated_new", "events_per_s",
            "events_per_cpu_s")
    print(f"{'method':<12}" + "".join(f"{k:>{len(k) + 2}}" for k in keys))
    for name, metrics in results.items():
        print(f"{name:<12}" + "".join(f"{metrics[k]:>{len(k) + 2},.0f}" if k.startswith("events")
                                      else f"{metrics[k]:>{len(k) + 2}.4f}" for k in keys))
    if args.json_out:
        out = {**results["recstream"], "mode": args.mode, "protocol": "session", "rejected": rejected,
               "events_files": list(args.events), "model_config": vars(config.model),
               "baselines": {k: v for k, v in results.items() if k != "recstream"}}
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2, default=float)
    return 0


def _plot(results: dict, args: argparse.Namespace, baseline_name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib (pip install 'recstream[eval]')") from exc
    from recstream.evaluation.prequential import rolling_mean

    window = 5000
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, result in results.items():
        if len(result.curve):
            ax.plot(rolling_mean(result.curve, window), label=f"baseline: {baseline_name}" if name == "baseline" else name)
    ax.set_xlabel("event")
    ax.set_ylabel(("absolute error" if args.mode == "explicit" else "hit@10") + f" (rolling mean of {window})")
    ax.set_title(f"prequential {args.mode}: {' '.join(args.events)}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


def cmd_export(args: argparse.Namespace) -> int:
    from recstream.stream.replay import export_state

    try:
        sizes = export_state(args.state_dir, args.out)
    except FileNotFoundError as exc:
        print(f"recstream: {exc}", file=sys.stderr)
        return 1
    print(f"exported {sizes['users']:,} users, {sizes['items']:,} items ({sizes['events']:,} events) to {args.out}")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from recstream.stream.broker import create_topics
    from recstream.stream.config import item_snapshot_topic_for, sync_topic_for, user_state_topic_for

    settings = dict(args.X or [])
    topics = {args.input_topic: args.partitions, args.output_topic: args.partitions,
              args.dlq_topic or f"{args.input_topic}.dlq": 1}
    configs = {}
    if args.group_id:
        # One partition: every member reads all of it, and keying by member keeps each one's order.
        # Deltas must not be compacted (that keeps one per key); the user state is keyed to be.
        topics[sync_topic_for(args.group_id)] = 1
        topics[user_state_topic_for(args.group_id)] = args.partitions
        topics[item_snapshot_topic_for(args.group_id)] = 1
        configs[user_state_topic_for(args.group_id)] = {"cleanup.policy": "compact"}
        configs[item_snapshot_topic_for(args.group_id)] = {"cleanup.policy": "compact"}
    create_topics(args.bootstrap_servers, topics, settings, topic_configs=configs)
    print(f"topics ready on {args.bootstrap_servers}: {', '.join(topics)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from confluent_kafka import Producer
    from recstream.stream.broker import produce_waiting
    from recstream.stream.logs import kafka_logger, settings_for
    from recstream.stream.synthetic import SyntheticClickstream

    producer = Producer({"bootstrap.servers": args.bootstrap_servers, "linger.ms": 20, "logger": kafka_logger(),
                         **settings_for("producer", dict(args.X or []))})
    gen = SyntheticClickstream(n_users=args.users, n_items=args.items, seed=args.seed,
                               start_ms=int(time.time() * 1000), events_per_second=args.rate or 1000.0)
    sent = 0
    started = time.monotonic()
    while sent < args.events:
        chunk = min(10_000, args.events - sent)
        for key, value in gen.events(chunk).messages():
            produce_waiting(producer, args.topic, value, key)
        producer.poll(0)
        sent += chunk
        if args.rate:
            time.sleep(max(0.0, started + sent / args.rate - time.monotonic()))
    producer.flush()
    print(f"produced {sent} events to {args.topic} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from recstream.stream.demo import run_demo

    return run_demo(duration_s=args.duration, rate=args.rate, n_users=args.users, n_items=args.items,
                    http_port=args.http_port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recstream", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one JSON object per line (time, level, logger, message)")
    sub = parser.add_subparsers(dest="command", required=True)

    kafka = argparse.ArgumentParser(add_help=False)
    kafka.add_argument("-X", action="append", type=_key_value, metavar="KEY=VALUE",
                       help="librdkafka setting (repeatable), as in kcat; goes to the consumer, the producer "
                            "or both, as librdkafka classifies it")

    run = sub.add_parser("run", parents=[kafka], help="consume a clickstream topic and publish recommendations")
    run.add_argument("--bootstrap-servers", help="Kafka brokers, host:port[,...] (config kafka.bootstrap.servers)")
    run.add_argument("--input-topic", help="clickstream topic (config topics.input, default clicks)")
    run.add_argument("--output-topic", help="recommendation updates (config topics.output, default recs)")
    run.add_argument("--dlq-topic", help="dead-letter topic (default: <input-topic>.dlq)")
    run.add_argument("--group-id", help="consumer group (config topics.group_id, default recstream)")
    run.add_argument("--state-dir", help="checkpoints and index files; makes state effectively-once")
    run.add_argument("--start", help="partitions the checkpoint does not know: committed (default), "
                                     "earliest, latest or an epoch time in ms")
    run.add_argument("--http-port", type=int, help="serve /metrics, /healthz, /readyz, /recommend/USER, "
                                                   "/similar/ITEM and a status page on this port (config http.port)")
    run.add_argument("--http-host", help="address to listen on (config http.host, default 127.0.0.1)")
    run.add_argument("--create-topics", action="store_true",
                     help="create the input, output and dead-letter topics if missing (with --partitions)")
    run.add_argument("--partitions", type=int, default=4, help="partitions of topics made by --create-topics")
    run.add_argument("--config", help="TOML config file (see README: Configuration)")
    run.add_argument("--set", action="append", type=_key_value, metavar="SECTION.KEY=VALUE",
                     help="override one config value, e.g. --set model.dim=64")
    run.set_defaults(func=cmd_run)

    replay = sub.add_parser("replay", parents=[kafka], help="apply an event log (file or topic) at full speed")
    replay.add_argument("--events", help="JSON lines, CSV (.gz accepted) or Parquet event log")
    replay.add_argument("--columns", help="CSV/Parquet column mapping, e.g. user_id=userId,item_id=movieId,rating=rating,ts=timestamp")
    replay.add_argument("--ts-unit", choices=("ms", "s"), default="ms", help="unit of a numeric CSV/Parquet ts column")
    replay.add_argument("--epochs", type=int, default=1, help="passes over the file")
    replay.add_argument("--from-topic", help="replay a topic instead (own group id, assign())")
    replay.add_argument("--bootstrap-servers")
    replay.add_argument("--start", default="earliest", help="earliest or epoch ms (record timestamps)")
    replay.add_argument("--end", default="latest", help="latest or epoch ms (record timestamps)")
    replay.add_argument("--item-metadata", help="item metadata JSON lines ({item_id, features, text}) for cold items")
    replay.add_argument("--state-dir", help="write the resulting checkpoint here (continues one if present)")
    replay.add_argument("--config")
    replay.add_argument("--set", action="append", type=_key_value, metavar="SECTION.KEY=VALUE")
    replay.add_argument("--quiet", action="store_true", help="no progress line")
    replay.set_defaults(func=cmd_replay)

    evaluate = sub.add_parser("eval", help="learning quality on an event log, beside a baseline")
    evaluate.add_argument("--events", required=True, nargs="+",
                          help="JSON lines, CSV/TSV (.gz accepted) or Parquet event log; several files are read "
                               "one after the other (with --order time, merged by time)")
    evaluate.add_argument("--columns", help="column mapping, e.g. user_id=userId,item_id=movieId,rating=rating; "
                                            "weight=COLUMN gives implicit weights")
    evaluate.add_argument("--delimiter", default=",", help="CSV delimiter ('tab' for TSV)")
    evaluate.add_argument("--ts-unit", choices=("ms", "s"), default="ms")
    evaluate.add_argument("--mode", choices=("explicit", "implicit"), default="explicit")
    evaluate.add_argument("--order", choices=("file", "time"), default="file",
                          help="stream the log in file order, or stably sorted by ts")
    evaluate.add_argument("--protocol", choices=("prequential", "split", "session"), default="prequential",
                          help="prequential: predict/rank then learn, in log order; split: per-user seeded "
                               "held-out fraction, learned for --epochs; session: next-click HR/MRR@20 "
                               "beside popularity, SR and V-SKNN (see evaluation/session.py)")
    evaluate.add_argument("--epochs", type=int, default=10)
    evaluate.add_argument("--test-fraction", type=float, default=0.2)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--weight-transform", choices=("none", "log1p"), default="none")
    evaluate.add_argument("--item-metadata", help="item metadata JSON lines ({item_id, features, text}): content "
                                                  "vectors for cold items; the baseline is then the model without it")
    evaluate.add_argument("--baseline", choices=("default", "none"), default="default")
    evaluate.add_argument("--members", type=_members, help="simulate a consumer group of N members, users split "
                          "by a hash of the id, item deltas exchanged (docs/scale-out.md); baseline: one process")
    evaluate.add_argument("--sync-every", type=_sync_every, metavar="K|never",
                          help="with --members: events of the group's stream between exchanges "
                               "(default: evaluation.members.DEFAULT_SYNC_EVERY)")
    evaluate.add_argument("--json-out")
    evaluate.add_argument("--plot", help="PNG of the metric over the stream (needs matplotlib)")
    evaluate.add_argument("--config")
    evaluate.add_argument("--set", action="append", type=_key_value, metavar="SECTION.KEY=VALUE")
    evaluate.add_argument("-X", action="append", type=_key_value, help=argparse.SUPPRESS)
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser("export", help="the latest checkpoint's state as a .npz")
    export.add_argument("--state-dir", required=True)
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_export)

    topics = sub.add_parser("topics", parents=[kafka], help="create the input, output and dead-letter topics")
    topics.add_argument("--bootstrap-servers", required=True)
    topics.add_argument("--input-topic", default="clicks")
    topics.add_argument("--output-topic", default="recs")
    topics.add_argument("--dlq-topic")
    topics.add_argument("--partitions", type=int, default=4)
    topics.add_argument("--group-id", help="also the topic through which the members of this consumer group "
                                           "share item state (for a group of more than one member)")
    topics.set_defaults(func=cmd_topics)

    gen = sub.add_parser("generate", parents=[kafka], help="produce a synthetic clickstream to a topic")
    gen.add_argument("--bootstrap-servers", required=True)
    gen.add_argument("--topic", default="clicks")
    gen.add_argument("--events", type=int, default=100_000)
    gen.add_argument("--rate", type=float, default=0.0, help="events per second (0: as fast as possible)")
    gen.add_argument("--users", type=int, default=20_000)
    gen.add_argument("--items", type=int, default=5_000)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="embedded broker + generator + live consumer, with live progress")
    demo.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: at Ctrl-C)")
    demo.add_argument("--rate", type=float, default=20_000.0, help="generated events per second")
    demo.add_argument("--users", type=int, default=20_000)
    demo.add_argument("--items", type=int, default=5_000)
    demo.add_argument("--http-port", type=int, default=8080,
                      help="status page, metrics and queries (another free port if taken; 0: off)")
    demo.set_defaults(func=cmd_demo)

    broker = sub.add_parser("broker", help="the embedded Kafka-protocol broker (tansu) on its own, until Ctrl-C")
    broker.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1")
    broker.add_argument("--topics", action="store_true", help="also create clicks, recs and clicks.dlq")
    broker.add_argument("--partitions", type=int, default=4, help="partitions of clicks and recs")
    broker.set_defaults(func=cmd_broker)

    for name, sub_parser in sub.choices.items():
        sub_parser.formatter_class = _HelpFormatter
        for action in sub_parser._actions:  # options with no help text still show their default
            if action.help is None and action.default not in (None, False, argparse.SUPPRESS):
                action.help = "default: %(default)s"
        sub_parser.epilog = "example:\n  " + EXAMPLES[name]
    return parser


EXAMPLES = {
    "run": "recstream run --bootstrap-servers localhost:9092 --input-topic clicks --output-topic recs "
           "--state-dir state/ --http-port 8080 --create-topics",
    "replay": "recstream replay --events ratings.csv --columns user_id=userId,item_id=movieId,rating=rating,"
              "ts=timestamp --ts-unit s --state-dir state/",
    "eval": "recstream eval --events ratings.csv --ts-unit s --order time --mode explicit "
            "--columns user_id=userId,item_id=movieId,rating=rating,ts=timestamp",
    "export": "recstream export --state-dir state/ --out state.npz",
    "topics": "recstream topics --bootstrap-servers localhost:9092 --partitions 12",
    "generate": "recstream generate --bootstrap-servers localhost:9092 --events 1000000 --rate 20000",
    "demo": "recstream demo --duration 60 --rate 50000",
    "broker": "recstream broker --port 9092 --topics",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default where it has one worth showing, and keeps the example's layout."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def cmd_broker(args: argparse.Namespace) -> int:
    from recstream.stream.broker import EmbeddedBroker, create_topics

    stop = threading.Event()
    _install_stop_handlers(stop)
    with EmbeddedBroker(port=args.port) as bootstrap:
        if args.topics:
            create_topics(bootstrap, {"clicks": args.partitions, "recs": args.partitions, "clicks.dlq": 1})
        print(f"embedded broker (tansu, memory storage: nothing survives a stop) on {bootstrap}"
              + ("; topics clicks, recs, clicks.dlq" if args.topics else "") + "; Ctrl-C to stop", flush=True)
        stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recstream.stream.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    from recstream.stream.broker import ClusterUnreachable
    from recstream.stream.checkpoint import IncompatibleCheckpoint, StateDirInUse

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"recstream: config error: {exc}", file=sys.stderr)
        return 2
    except StateDirInUse as exc:
        print(f"recstream: {exc}", file=sys.stderr)
        return 2
    except ClusterUnreachable as exc:
        print(f"recstream: {exc}", file=sys.stderr)
        return 3
    except IncompatibleCheckpoint as exc:
        print(f"recstream: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
