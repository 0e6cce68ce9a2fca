"""Checkpoint cost at scale: time and size to write, time to restore, and what the consumer pays.

The service writes checkpoints from a forked child (``BackgroundCheckpointWriter``): the consumer
pays the fork, then copy-on-write page faults as it writes to pages the child still shares. The
baseline, in the same invocation, is what it paid before: a copy of the whole state (``snapshot()``).
And a 200k-event batch is timed alone and right after a fork, while the child writes.

    python bench/checkpoint.py [--users 1000000] [--items 100000] [--dim 64] [--events 3000000]

State: ``--users`` users and ``--items`` items at ``--dim``, learned from ``--events``
implicit events (uniform users, Zipf items), with their interaction histories.
Medians over ``--repeats`` saves/restores. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from recstream.embeddings.model import MFConfig
from recstream.stream.checkpoint import BackgroundCheckpointWriter, CheckpointStore
from recstream.stream.config import CheckpointConfig
from recstream.stream.events import EventBatch
from recstream.stream.state import RecState


def build_state(n_users: int, n_items: int, dim: int, n_events: int) -> RecState:
    rng = np.random.default_rng(0)
    state = RecState(MFConfig(dim=dim))
    # Every user and item exists (ids in order), then the events.
    state.model.users.rows([f"user-{u}" for u in range(n_users)])
    state.model.items.rows([f"item-{i}" for i in range(n_items)])
    step = 1_000_000
    for start in range(0, n_events, step):
        n = min(step, n_events - start)
        users = rng.integers(0, n_users, n)
        items = (rng.zipf(1.2, n) - 1) % n_items
        batch = EventBatch([f"user-{u}" for u in users.tolist()], [f"item-{i}" for i in items.tolist()],
                           np.full(n, np.nan, np.float32), np.ones(n, np.float32), np.zeros(n, np.int64),
                           list(range(n)))
        state.apply(batch, "clicks", np.zeros(n, dtype=np.int64))
    state.advance({"clicks/0": n_events})
    return state


def timed_batch(state: RecState, n_users: int, n_items: int, seed: int, n: int = 200_000) -> float:
    """Seconds to apply ``n`` events of known users and items (the consumer's work)."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, n_users, n), (rng.zipf(1.2, n) - 1) % n_items
    batch = EventBatch([f"user-{u}" for u in users.tolist()], [f"item-{i}" for i in items.tolist()],
                       np.full(n, np.nan, np.float32), np.ones(n, np.float32), np.zeros(n, np.int64), list(range(n)))
    started = time.perf_counter()
    state.apply(batch, "clicks", np.zeros(n, dtype=np.int64))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/checkpoint.json")
    args = parser.parse_args()

    state = build_state(args.users, args.items, args.dim, args.events)
    directory = Path(tempfile.mkdtemp(prefix="recstream-ckpt-bench-"))
    try:
        store = CheckpointStore(directory, keep=2)
        saves, restores, snapshots = [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            arrays, meta = state.snapshot()
            snapshots.append(time.perf_counter() - started)
            started = time.perf_counter()
            path = store.save(arrays, meta)
            saves.append(time.perf_counter() - started)
        size = path.with_suffix(".npz").stat().st_size
        for _ in range(args.repeats):
            started = time.perf_counter()
            restored = RecState.restore(store.load_latest(), MFConfig(dim=args.dim))
            restores.append(time.perf_counter() - started)
        assert np.array_equal(restored.model.users.vectors, state.model.users.vectors)
        forks, batches, batches_after_fork, copies, batches_after_copy = [], [], [], [], []
        writer = BackgroundCheckpointWriter(store)
        for r in range(args.repeats):
            batches.append(timed_batch(state, args.users, args.items, seed=100 + r))
            # The old way, as the baseline: copy the state, write the copy on a thread.
            started = time.perf_counter()
            copy = state.snapshot()
            thread = threading.Thread(target=store.save, args=copy)
            thread.start()
            copies.append(time.perf_counter() - started)
            batches_after_copy.append(timed_batch(state, args.users, args.items, seed=300 + r))
            thread.join()
            del copy
            started = time.perf_counter()
            writer.start(lambda: state.snapshot(copy=False))
            forks.append(time.perf_counter() - started)
            batches_after_fork.append(timed_batch(state, args.users, args.items, seed=200 + r))
            writer.wait()
            assert writer.take_outcome()[2] is None
    finally:
        shutil.rmtree(directory)

    interval = CheckpointConfig().interval_s
    result = {
        "users": args.users, "items": args.items, "dim": args.dim, "events": args.events,
        "size_mb": size / 1e6,
        "median_snapshot_s": statistics.median(snapshots),
        "median_write_s": statistics.median(saves),
        "median_restore_s": statistics.median(restores),
        "default_interval_s": interval,
        "median_fork_s": statistics.median(forks),
        "median_batch_s": statistics.median(batches),
        "median_batch_after_fork_s": statistics.median(batches_after_fork),
        "median_copy_and_thread_start_s": statistics.median(copies),
        "median_batch_after_copy_s": statistics.median(batches_after_copy),
        # What a checkpoint costs the consumer: the stall, plus how much slower the next batch runs.
        "consumer_cost_before_s": statistics.median(copies) + statistics.median(batches_after_copy)
                                  - statistics.median(batches),
        "consumer_cost_now_s": statistics.median(forks) + statistics.median(batches_after_fork)
                               - statistics.median(batches),
        "stall_ratio_fork_to_copy": statistics.median(forks) / statistics.median(snapshots),
        "consumer_stall_share_at_default_interval": (statistics.median(forks) + statistics.median(batches_after_fork)
                                                     - statistics.median(batches)) / interval,
        "runs": {"snapshot_s": snapshots, "write_s": saves, "restore_s": restores, "fork_s": forks,
                 "batch_s": batches, "batch_after_fork_s": batches_after_fork, "copy_s": copies,
                 "batch_after_copy_s": batches_after_copy},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"| {args.users:,} users, {args.items:,} items, d={args.dim}, {args.events:,} events | value |")
    print("|---|---:|")
    print(f"| checkpoint size | {size / 1e6:,.0f} MB |")
    print(f"| before: copy of the state (the consumer stalled) | {result['median_snapshot_s']:.2f} s |")
    print(f"| now: fork of the writer (the consumer stalls) | {result['median_fork_s']:.3f} s |")
    print(f"| a 200k-event batch: alone / after a copy (writer thread) / after a fork (writer child) | "
          f"{result['median_batch_s']:.2f} / {result['median_batch_after_copy_s']:.2f} / "
          f"{result['median_batch_after_fork_s']:.2f} s |")
    print(f"| consumer's cost of a checkpoint (stall + slower batch): before / now | "
          f"{result['consumer_cost_before_s']:.2f} / {result['consumer_cost_now_s']:.2f} s |")
    print(f"| write + fsync + checksum (background) | {result['median_write_s']:.2f} s |")
    print(f"| restore (read, verify, rebuild) | {result['median_restore_s']:.2f} s |")
    print(f"| stall share at the default {interval:.0f} s interval | "
          f"{result['consumer_stall_share_at_default_interval']:.1%} |")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
