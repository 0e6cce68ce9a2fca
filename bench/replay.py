"""Backfill speed: ``replay_file`` (what ``recstream replay --events`` runs) on one generated log,
as JSON lines and as Parquet, beside the update alone on the same events, in one invocation:

(a) model update alone: id mapping + the compiled SGD kernel (``EmbeddingTable.rows`` + ``learn_rows``),
    10k-event batches decoded beforehand (fresh strings each run); the issue's "compiled update";
(b) state update alone: ``RecState.apply`` on the same events already decoded (model + interaction
    history): everything a replay does except reading and decoding;
(c) ``replay_file`` on the JSON-lines log;
(d) ``replay_file`` on the Parquet log.

The log (``--events`` events, ``--users`` users with Zipf(0.8) activity, ``--items`` items with
Zipf(1.0) popularity, ids like ``"u123"``/``"i456"``, view/click/purchase, ms timestamps) is
generated once and kept in ``--cache`` (outside the repository). Medians of ``--repeats`` runs of
wall-clock and of CPU time (the machine is shared: CPU time is the steadier measure); ratios
against (a). Writes JSON and prints a table.

    python bench/replay.py [--events 3000000] [--users 1000000] [--items 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from recstream.embeddings.model import MFConfig, OnlineMF
from recstream.stream.config import EventsConfig
from recstream.stream.events import EventDecoder
from recstream.stream.replay import replay_file
from recstream.stream.state import RecState

EVENT_TYPES = ("view", "click", "purchase")
BATCH = 10_000


def zipf_draws(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """``size`` draws from 0..n-1 with P(rank k) ~ (k+1)^-exponent, ranks shuffled onto ids
    (so the most active user is not ``u0``)."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1])
    return rng.permutation(n)[np.minimum(ranks, n - 1)]


def generate(path_stem: Path, events: int, users: int, items: int, seed: int) -> tuple[Path, Path]:
    """Write ``<stem>.jsonl`` and ``<stem>.parquet`` with the same events (once: reused if present)."""
    jsonl, parquet = path_stem.with_suffix(".jsonl"), path_stem.with_suffix(".parquet")
    if jsonl.exists() and parquet.exists():
        return jsonl, parquet
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    user_ids = np.char.add("u", zipf_draws(rng, users, events, 0.8).astype(str))
    item_ids = np.char.add("i", zipf_draws(rng, items, events, 1.0).astype(str))
    kinds = np.array(EVENT_TYPES)[rng.choice(len(EVENT_TYPES), size=events, p=(0.6, 0.3, 0.1))]
    ts = 1_700_000_000_000 + np.cumsum(rng.integers(0, 3, size=events))
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = jsonl.with_suffix(".jsonl.part")
    with open(tmp, "w") as out:
        for start in range(0, events, 100_000):
            end = min(start + 100_000, events)
            out.writelines(f'{{"user_id":"{u}","item_id":"{i}","event_type":"{k}","ts":{t}}}\n' for u, i, k, t in
                           zip(user_ids[start:end].tolist(), item_ids[start:end].tolist(),
                               kinds[start:end].tolist(), ts[start:end].tolist()))
    tmp.rename(jsonl)
    table = pa.table({"user_id": user_ids, "item_id": item_ids, "event_type": kinds, "ts": ts})
    pq.write_table(table, parquet.with_suffix(".parquet.part"), row_group_size=128 * 1024)
    parquet.with_suffix(".parquet.part").rename(parquet)
    return jsonl, parquet


def decoded_batches(jsonl: Path) -> list:
    """The log's events decoded into 10k-event batches, for the update-only timings."""
    decoder = EventDecoder(EventsConfig())
    lines = jsonl.read_bytes().splitlines()
    return [decoder.decode(lines[s:s + BATCH])[0] for s in range(0, len(lines), BATCH)]


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``run()``: on a shared machine the CPU time
    is the steadier measure of the work done (the wall time also counts waiting for a core)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def model_update(batches: list, cfg: MFConfig) -> tuple[float, float]:
    """Decoded batches through the id maps and the kernel, as ``bench/throughput.py``'s update."""
    mf = OnlineMF(cfg)

    def run() -> None:
        for batch in batches:
            mf.learn_rows(mf.users.rows(batch.user_ids), mf.items.rows(batch.item_ids), batch.ratings,
                          batch.weights, timestamps=batch.timestamps)

    return timed(run)


def state_update(batches: list, cfg: MFConfig) -> tuple[float, float]:
    state = RecState(cfg)
    return timed(lambda: [state.apply(batch) for batch in batches])


def replay(path: Path, cfg: MFConfig, states: dict) -> tuple[float, float]:
    state = states[path.suffix] = RecState(cfg)
    return timed(lambda: replay_file(state, EventDecoder(EventsConfig()), path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "recstream-bench-replay"),
                        help="where the generated logs are kept between runs")
    parser.add_argument("--out", default="bench/results/replay.json")
    args = parser.parse_args()

    started = time.perf_counter()
    stem = Path(args.cache) / f"log-{args.events}-{args.users}-{args.items}-{args.seed}"
    jsonl, parquet = generate(stem, args.events, args.users, args.items, args.seed)
    print(f"log: {jsonl} ({jsonl.stat().st_size / 1e6:.0f} MB), {parquet} ({parquet.stat().st_size / 1e6:.0f} MB) "
          f"in {time.perf_counter() - started:.1f}s")
    cfg = MFConfig(dim=args.dim)
    model_update(decoded_batches(jsonl)[:1], cfg)  # compile the kernels outside the timings

    names = ("model_update", "state_update", "replay_jsonl", "replay_parquet")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        states: dict = {}
        # Freshly decoded ids for each update-only run: a string looked up before has its hash
        # cached, which a replay, whose ids are always new strings, never has.
        for name, run in zip(names, (lambda: model_update(decoded_batches(jsonl), cfg),
                                     lambda: state_update(decoded_batches(jsonl), cfg),
                                     lambda: replay(jsonl, cfg, states), lambda: replay(parquet, cfg, states))):
            seconds, cpu_seconds = run()
            wall[name].append(args.events / seconds)
            cpu[name].append(args.events / cpu_seconds)
        # The two inputs must have taught the same model (the tests check this on small logs too).
        assert np.array_equal(states[".jsonl"].model.items.vectors, states[".parquet"].model.items.vectors)
        states.clear()  # free the four models before the next run
        print(f"run {r + 1}/{args.repeats}: " + ", ".join(f"{k} {wall[k][-1]:,.0f}/s (CPU {cpu[k][-1]:,.0f}/s)"
                                                         for k in names))

    medians = {k: statistics.median(v) for k, v in wall.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "events": args.events, "users": args.users, "items": args.items, "dim": args.dim, "seed": args.seed,
        "repeats": args.repeats, "machine": f"{platform.machine()}, {platform.python_version()}, "
                                            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "events_per_s": wall, "events_per_cpu_s": cpu,
        "median_events_per_s": medians, "median_events_per_cpu_s": cpu_medians,
        "ratio_to_model_update": {k: v / medians["model_update"] for k, v in medians.items()},
        "cpu_ratio_to_model_update": {k: v / cpu_medians["model_update"] for k, v in cpu_medians.items()},
        "bytes": {"jsonl": jsonl.stat().st_size, "parquet": parquet.stat().st_size},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| measure ({args.events:,} events, median of {args.repeats}) | events/s | x model update "
          f"| events per CPU s | x model update |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        print(f"| {name} | {medians[name]:,.0f} | {medians[name] / medians['model_update']:.2f} "
              f"| {cpu_medians[name]:,.0f} | {cpu_medians[name] / cpu_medians['model_update']:.2f} |")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
