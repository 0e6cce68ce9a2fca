"""Memory per user and per item, and capped runs on floods of new user ids and of new item ids.

    python bench/memory.py [--ids 400000] [--flood 1000000] [--cap 100000] [--item-cap 50000] \
        [--dim 32] [--scenarios users,capped,flood-uncapped,items,items-capped] \
        [--out bench/results/memory.json]

Each scenario runs in a process of its own (its RSS is its own) and applies batches of 10,000
events through ``RecState.apply`` (the path the service takes), with the service's default model
settings (session signals on, history of 500 items per user):

- ``users``: ``--ids`` events, each from a user never seen before, on 10,000 items;
- ``capped``: ``--flood`` such events with ``model.max_users = --cap`` (and, for the rate, the
  same run uncapped: ``flood-uncapped``);
- ``items``: ``--ids`` events, each on an item never seen before, from 10,000 users;
- ``items-capped``: the same with ``model.max_items = --item-cap`` (``items`` is its uncapped run);
- ``million`` (only when named in ``--scenarios``): ``--million`` events, each from a new user on a
  new item: the state of that many users and items at once, and the peak RSS of the process
  (the service's checkpoints fork instead of copying, so this scenario's snapshots copy nothing).

RSS (``/proc/self/statm``) is read after every 100,000 events; "per id" is its growth over the
second half of the run divided by the ids added there (the first half pays for imports and the
numba kernels). "Checkpoint bytes per id" is the growth of the state's arrays (what a checkpoint
holds: the model's tables, histories, sessions) over the same half. Events/s are per scenario, in
one invocation, so the capped and uncapped rates compare; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 10_000
STEP = 100_000
FIXED = 10_000  # items in the "users" scenarios, users in the "items" one


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_scenario(scenario: str, n_ids: int, cap: int, dim: int) -> dict:
    """One scenario in this process; ``cap``: ``max_users`` of ``capped``, ``max_items`` of ``items-capped``."""
    import resource

    from recstream.embeddings.model import MFConfig
    from recstream.stream.events import EventBatch
    from recstream.stream.state import RecState

    state = RecState(MFConfig(dim=dim, max_users=cap if scenario == "capped" else 0,
                              max_items=cap if scenario == "items-capped" else 0))
    rng = np.random.default_rng(0)
    marks, seconds = [], 0.0
    for start in range(0, n_ids, BATCH):
        fresh = [f"new-{n}" for n in range(start, start + BATCH)]
        fixed = [f"x{x}" for x in rng.integers(0, FIXED, BATCH).tolist()]
        users, items = (fixed, fresh) if scenario.startswith("items") else (fresh, fixed)
        if scenario == "million":
            users, items = fresh, [f"item-{n}" for n in range(start, start + BATCH)]
        ts = 1_700_000_000_000 + np.arange(start, start + BATCH, dtype=np.int64) * 100
        batch = EventBatch(users, items, np.full(BATCH, np.nan, np.float32), np.ones(BATCH, np.float32), ts,
                           list(range(BATCH)))
        began = time.perf_counter()
        state.apply(batch)
        seconds += time.perf_counter() - began
        if (start + BATCH) % STEP == 0:
            rss_before = _rss()
            arrays, _ = state.snapshot(copy=scenario != "million")
            marks.append({"events": start + BATCH, "rss_bytes": _rss(), "rss_before_snapshot_bytes": rss_before,
                          "state_bytes": int(sum(a.nbytes for a in arrays.values())),
                          "users_held": state.model.users.ids.live, "user_rows": len(state.model.users),
                          "items_held": state.model.items.ids.live, "item_rows": len(state.model.items)})
            del arrays  # (held until the next mark, a snapshot would count in the RSS read before it)
    half = marks[len(marks) // 2 - 1]
    last = marks[-1]
    added = last["events"] - half["events"]
    return {
        "scenario": scenario,
        "marks": marks,
        "rss_bytes_per_id": (last["rss_bytes"] - half["rss_bytes"]) / added,
        "rss_growth_per_100k_ids_mb": (last["rss_bytes"] - half["rss_bytes"]) / added * STEP / 2**20,
        "checkpoint_bytes_per_id": (last["state_bytes"] - half["state_bytes"]) / added,
        "events_per_s": n_ids / seconds,
        "users_forgotten": state.users_forgotten,
        "items_forgotten": state.items_forgotten,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=400_000)
    parser.add_argument("--flood", type=int, default=1_000_000)
    parser.add_argument("--cap", type=int, default=100_000)
    parser.add_argument("--item-cap", type=int, default=50_000)
    parser.add_argument("--million", type=int, default=1_000_000, help="users and items of the million scenario")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--scenarios", default="users,capped,flood-uncapped,items,items-capped",
                        help="a subset runs only those; the others' results are kept from --out")
    parser.add_argument("--out", default="bench/results/memory.json")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)  # one scenario, in this process (internal)
    args = parser.parse_args()
    if args.scenario:
        print(json.dumps(run_scenario(args.scenario, args.ids, args.cap, args.dim)))
        return
    out_path = Path(args.out)
    results = json.loads(out_path.read_text())["scenarios"] if out_path.exists() else {}
    for scenario in args.scenarios.split(","):
        n_ids = (args.flood if scenario in ("capped", "flood-uncapped") else args.million if scenario == "million"
                 else args.ids)
        cap = args.item_cap if scenario == "items-capped" else args.cap
        out = subprocess.run([sys.executable, __file__, "--scenario", scenario, "--ids", str(n_ids),
                              "--cap", str(cap), "--dim", str(args.dim)],
                             check=True, capture_output=True, text=True).stdout
        results[scenario] = json.loads(out.strip().splitlines()[-1])
    uncapped, capped, flood = results["users"], results["capped"], results["flood-uncapped"]
    items, items_capped = results["items"], results["items-capped"]
    summary = {
        "ids": args.ids, "flood": args.flood, "cap": args.cap, "item_cap": args.item_cap, "dim": args.dim,
        "rss_bytes_per_user": uncapped["rss_bytes_per_id"],
        "checkpoint_bytes_per_user": uncapped["checkpoint_bytes_per_id"],
        "rss_bytes_per_item": items["rss_bytes_per_id"],
        "checkpoint_bytes_per_item": items["checkpoint_bytes_per_id"],
        "capped_rss_growth_per_100k_new_users_mb": capped["rss_growth_per_100k_ids_mb"],
        "uncapped_rss_growth_per_100k_new_users_mb": flood["rss_growth_per_100k_ids_mb"],
        "capped_rss_mb": capped["marks"][-1]["rss_bytes"] / 2**20,
        "uncapped_rss_mb": flood["marks"][-1]["rss_bytes"] / 2**20,
        "capped_over_uncapped_events_per_s": capped["events_per_s"] / flood["events_per_s"],
        "capped_rss_growth_per_100k_new_items_mb": items_capped["rss_growth_per_100k_ids_mb"],
        "uncapped_rss_growth_per_100k_new_items_mb": items["rss_growth_per_100k_ids_mb"],
        "items_capped_rss_mb": items_capped["marks"][-1]["rss_bytes"] / 2**20,
        "items_uncapped_rss_mb": items["marks"][-1]["rss_bytes"] / 2**20,
        "items_capped_over_uncapped_events_per_s": items_capped["events_per_s"] / items["events_per_s"],
        "scenarios": results,
    }
    if "million" in results:
        million = results["million"]
        summary["million"] = {"users": million["marks"][-1]["users_held"], "items": million["marks"][-1]["items_held"],
                              "rss_mb": million["marks"][-1]["rss_before_snapshot_bytes"] / 2**20,
                              "rss_with_snapshot_mb": million["marks"][-1]["rss_bytes"] / 2**20,
                              "peak_rss_mb": million["peak_rss_bytes"] / 2**20,
                              "state_mb": million["marks"][-1]["state_bytes"] / 2**20}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"per user: {summary['rss_bytes_per_user']:,.0f} B RSS, {summary['checkpoint_bytes_per_user']:,.0f} B "
          f"of state arrays; per item: {summary['rss_bytes_per_item']:,.0f} B RSS, "
          f"{summary['checkpoint_bytes_per_item']:,.0f} B of state arrays")
    print(f"{args.flood:,} new users, RSS growth per 100k over the second half (RSS at the end): uncapped "
          f"{summary['uncapped_rss_growth_per_100k_new_users_mb']:.1f} MB ({summary['uncapped_rss_mb']:,.0f} MB), "
          f"capped at {args.cap:,} {summary['capped_rss_growth_per_100k_new_users_mb']:.1f} MB "
          f"({summary['capped_rss_mb']:,.0f} MB); "
          f"capped/uncapped events/s {summary['capped_over_uncapped_events_per_s']:.2f}")
    print(f"{args.ids:,} new items, RSS growth per 100k over the second half (RSS at the end): uncapped "
          f"{summary['uncapped_rss_growth_per_100k_new_items_mb']:.1f} MB ({summary['items_uncapped_rss_mb']:,.0f} MB), "
          f"capped at {args.item_cap:,} {summary['capped_rss_growth_per_100k_new_items_mb']:.1f} MB "
          f"({summary['items_capped_rss_mb']:,.0f} MB); "
          f"capped/uncapped events/s {summary['items_capped_over_uncapped_events_per_s']:.2f}")
    if "million" in summary:
        m = summary["million"]
        print(f"{m['users']:,} users and {m['items']:,} items held: RSS {m['rss_mb']:,.0f} MB, "
              f"{m['rss_with_snapshot_mb']:,.0f} MB holding a snapshot (peak {m['peak_rss_mb']:,.0f} MB), "
              f"state arrays {m['state_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
