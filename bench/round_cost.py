"""What one publishing round costs per user, stage by stage, on a replayed million-user model.

The stream of ``bench/scale.py`` (Zipf 0.8 users, Zipf 1.0 items, string ids) is written as
Parquet and replayed into a state dir (``recstream replay``); then, in this process, with the
service's recommender and an Annoy index built over the final item vectors, chunks of live events
(``--chunk`` events, the next part of the same stream) are applied and their users recommended as
one round, ``--rounds`` times after two to warm up. Each stage of ``Recommender.recommend`` is
timed by wrapping it; the message encoding is timed separately. No broker: what the numbers leave
out is the production and delivery of the messages.

    python bench/round_cost.py [--users 1000000] [--items 1000000] [--events 2000000] [--chunk 4000]
                               [--rounds 8] [--set index.max_lookups=0]

Writes ``bench/results/round-cost.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).parent))
from recstream.index.query import Recommender  # noqa: E402
from recstream.index.refresh import IndexRefresher  # noqa: E402
from recstream.stream.checkpoint import CheckpointStore  # noqa: E402
from recstream.stream.config import load_config  # noqa: E402
from recstream.stream.events import EventDecoder  # noqa: E402
from recstream.stream.state import RecState  # noqa: E402
from recstream.stream.synthetic import EVENT_TYPES, SyntheticClickstream  # noqa: E402
from recstream.stream.update_json import update_values  # noqa: E402
from scale import machine  # noqa: E402  (bench/ is not a package)

STAGES = ("_session_top", "_factor_top", "hot_items", "_seen", "_exact_top", "_tail_possible", "_add_tail", "eligible")


def write_parquet(path: Path, users: np.ndarray, items: np.ndarray, types: np.ndarray, ts: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": [f"u{u}" for u in users.tolist()], "item_id": [f"i{i}" for i in items.tolist()],
                             "event_type": [EVENT_TYPES[e] for e in types.tolist()], "ts": ts}), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--chunk", type=int, default=4000, help="live events per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default="bench/results/round-cost.json")
    args = parser.parse_args()
    overrides = dict(setting.split("=", 1) for setting in args.set)
    config = load_config(overrides=overrides)
    info = machine()
    live_n = args.chunk * (args.rounds + 2)
    gen = SyntheticClickstream(n_users=args.users, n_items=args.items, seed=0, zipf_exponent=1.0,
                               user_zipf_exponent=0.8, start_ms=int(time.time() * 1000) - args.events)
    events = gen.events(args.events + live_n)
    with tempfile.TemporaryDirectory(prefix="round-cost-") as tmp:
        log_path, state_dir = Path(tmp) / "events.parquet", Path(tmp) / "state"
        cut = slice(0, args.events)
        write_parquet(log_path, events.users[cut], events.items[cut], events.event_types[cut], events.ts[cut])
        started = time.time()
        subprocess.run([sys.executable, "-m", "recstream.stream.cli", "replay", "--events", str(log_path),
                        "--columns", "user_id=user_id,item_id=item_id,event_type=event_type,ts=ts",
                        "--state-dir", str(state_dir), "--quiet", *[f"--set={s}" for s in args.set]], check=True)
        replay_s = time.time() - started
        state = RecState.load_or_new(CheckpointStore(state_dir / "checkpoints"), config.model,
                                     config.output.history_per_user)
        model = state.model
        started = time.time()
        index = IndexRefresher(model, threading.Lock(), Path(tmp) / "index", config.index).rebuild()
        build_s = time.time() - started
        out = config.output
        recommender = Recommender(model, state.history if out.exclude_seen else None, out.top_k,
                                  config.index.search_k, exact_items=config.index.exact_items,
                                  max_lookups=config.index.max_lookups, sessions=state.sessions,
                                  min_item_events=config.index.min_item_events)
        seconds: dict[str, float] = collections.defaultdict(float)

        def timed(owner, name: str, label: str) -> None:
            method = getattr(owner, name)

            def run(*a, **k):
                t0 = time.perf_counter()
                try:
                    return method(*a, **k)
                finally:
                    seconds[label] += time.perf_counter() - t0
            setattr(owner, name, run)

        for name in STAGES:
            timed(recommender, name, name.strip("_"))
        timed(state.sessions, "candidates_csr", "session_top: of it, session candidates")
        decoder = EventDecoder(config.events)
        users_total = lookups = tail_possible = settled = 0
        apply_s = recommend_s = message_s = 0.0
        for r in range(args.rounds + 2):
            at = args.events + r * args.chunk
            dumps = orjson.dumps
            values = [dumps({"user_id": f"u{u}", "item_id": f"i{i}", "event_type": EVENT_TYPES[e], "ts": t})
                      for u, i, e, t in zip(events.users[at:at + args.chunk].tolist(),
                                            events.items[at:at + args.chunk].tolist(),
                                            events.event_types[at:at + args.chunk].tolist(),
                                            events.ts[at:at + args.chunk].tolist())]
            batch, _ = decoder.decode(values)
            if r == 2:  # warmed up: count from here
                seconds.clear()
                users_total = lookups = tail_possible = settled = 0
                apply_s = recommend_s = message_s = 0.0
            t0 = time.perf_counter()
            user_rows, _, _ = state.apply(batch)
            t1 = time.perf_counter()
            rows = np.unique(user_rows)
            top = recommender.recommend(rows, index, int(batch.timestamps.max()))
            t2 = time.perf_counter()
            update_values(model.users.ids, model.items.ids, top.user_rows, top.item_rows, top.scores,
                          np.zeros(len(rows), np.int64), index.version, model.model_version, 0)
            t3 = time.perf_counter()
            apply_s, recommend_s, message_s = apply_s + t1 - t0, recommend_s + t2 - t1, message_s + t3 - t2
            users_total += len(rows)
            lookups += recommender.last.index_lookups
            settled += recommender.last.settled_by_session
            tail_possible += recommender.last.tail_possible
    per_user = {label: 1e6 * s / users_total for label, s in sorted(seconds.items(), key=lambda kv: -kv[1])}
    result = {
        "command": " ".join([sys.executable, *sys.argv]), "machine": info, "settings": overrides,
        "workload": {"users": args.users, "items": args.items, "events": args.events, "chunk": args.chunk,
                     "rounds": args.rounds},
        "model": {"users": len(model.users), "items": len(model.items)}, "replay_s": replay_s, "build_s": build_s,
        "users_per_round": users_total / args.rounds, "index_lookups_per_round": lookups / args.rounds,
        "tail_possible_per_round": tail_possible / args.rounds,
        "settled_by_session_share": settled / max(users_total, 1),
        "us_per_user": {"recommend": 1e6 * recommend_s / users_total, "message": 1e6 * message_s / users_total,
                        **{f"recommend: {k}": v for k, v in per_user.items()}},
        "apply_us_per_event": 1e6 * apply_s / (args.rounds * args.chunk),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"| stage ({result['model']['users']:,} users, {result['model']['items']:,} items; "
          f"{result['users_per_round']:,.0f} users per round of {args.chunk:,} events) | µs per user |")
    print("|---|---:|")
    for label, value in result["us_per_user"].items():
        print(f"| {label} | {value:,.1f} |")
    print(f"| (apply, per event) | {result['apply_us_per_event']:,.1f} |")
    print(f"\nindex lookups per round {result['index_lookups_per_round']:,.0f} "
          f"(users whose tail could win: {result['tail_possible_per_round']:,.0f}); lists settled by the session "
          f"candidates alone: {result['settled_by_session_share']:.0%}; written to {args.out}")


if __name__ == "__main__":
    main()
