"""Quality of one model learned by a consumer group: bench/results/members-quality*.json.

    python bench/members_quality.py ../shared/data [--modes explicit implicit] [--members 1 2 4 8]
        [--sync-every 1 100 1000 5000 10000 25000 never] [--tag NAME --set SECTION.KEY=VALUE ...]
        [--share popularity sessions]

Runs ``recstream eval --members N --sync-every K`` (evaluation/members.py) on the MovieLens
latest-small rows of bench/quality.py (same commands: time order, explicit and implicit), one
process per row, one after the other:

- N = each of ``--members`` at the default sync interval, and each N > 1 never syncing
  ("no sync": each member alone, what the sync buys);
- N = 4 at each of ``--sync-every``.

Each row's ratio is against N = 1 of the same invocation, which is exactly the single process
(tests/test_members.py holds it to that). ``--set`` passes model settings to every row (the rows
then go to ``members-quality-TAG.json``). ``--share`` (implicit) runs the experiments of
``evaluation.members.MemberStates`` in this process, on the data the same eval command loads,
and writes ``members-quality-share-WHAT[-TAG].json``. Prints the tables docs/scale-out.md shows.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from quality import runs  # the README's MovieLens rows: the same eval commands

HERE = Path(__file__).resolve().parent
METRICS = {"explicit": ("mae", "rmse"), "implicit": ("hit_rate@10", "ndcg@10")}
# The sweep's group size: enough members that each holds a quarter of the users.
SWEEP_MEMBERS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--modes", nargs="+", choices=tuple(METRICS), default=list(METRICS))
    parser.add_argument("--members", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--sync-every", nargs="+", default=["1", "100", "1000", "5000", "10000", "25000", "never"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--tag", help="name of this variant (with --set)")
    parser.add_argument("--share", nargs="+", choices=("popularity", "sessions"), default=[],
                        help="implicit: members share what the service does not (experiments)")
    args = parser.parse_args()
    from recstream.evaluation.members import DEFAULT_SYNC_EVERY

    recstream = Path(sys.executable).parent / "recstream"
    default = str(DEFAULT_SYNC_EVERY)
    plan = [(n, default) for n in args.members] + [(n, "never") for n in args.members if n > 1]
    plan += [(SWEEP_MEMBERS, k) for k in args.sync_every if (SWEEP_MEMBERS, k) not in plan]
    if (1, default) not in plan:
        plan.insert(0, (1, default))
    settings = [a for s in args.set for a in ("--set", s)]
    out = {"default_sync_every": DEFAULT_SYNC_EVERY, "settings": args.set, "rows": []}
    for mode in args.modes:
        eval_args, _ = runs(args.data)[f"ml-{mode}"]
        for members, sync_every in plan:
            command = [str(recstream), "eval", *eval_args, *settings, "--members", str(members),
                       "--sync-every", sync_every, "--baseline", "none"]
            print(f"== {mode} N={members} K={sync_every}: {shlex.join(command)}", flush=True)
            if args.share:
                result = _shared(command[2:], members, args.share)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    json_out = Path(tmp) / "eval.json"
                    subprocess.run([*command, "--json-out", str(json_out)], check=True, stdout=subprocess.DEVNULL)
                    result = json.loads(json_out.read_text())
            out["rows"].append({"mode": mode, "command": shlex.join(["recstream", *command[1:]]),
                                **{k: result[k] for k in ("members", "sync_every", "syncs", "sync_messages",
                                                          "sync_bytes", "sync_items", "events", "events_per_s",
                                                          *METRICS[mode])},
                                **({k: result[k] for k in ("events_evaluated", "events_unknown_item")} if mode == "implicit"
                                   else {})})
    name = "-".join(["members-quality", *(["share", *args.share] if args.share else []),
                     *([args.tag] if args.tag else [])]) + ".json"
    out["shared"] = args.share
    (HERE / "results" / name).write_text(json.dumps(out, indent=2) + "\n")
    print_tables(out)


def _shared(eval_args: list[str], members: int, share: list[str]) -> dict:
    """The eval command's data and settings, run with ``share_*`` in this process."""
    from recstream.evaluation import members as em
    from recstream.stream import cli

    args = cli.build_parser().parse_args(["eval", *eval_args])
    if args.mode != "implicit":
        raise SystemExit("--share runs implicit experiments: use --modes implicit")
    config = cli._config(args, {})
    data, _ = cli._load_interactions(args, config)
    return em.members_implicit(data, config.model, members, args.sync_every, share_popularity="popularity" in share,
                               share_sessions="sessions" in share).metrics


def print_tables(out: dict) -> None:
    """Markdown tables: quality by group size, then by sync interval, each against N = 1."""
    for mode, keys in METRICS.items():
        rows = [r for r in out["rows"] if r["mode"] == mode]
        if not rows:
            continue
        single = next(r for r in rows if r["members"] == 1)
        print(f"\n{mode}: " + ", ".join(f"{k} {single[k]:.4f}" for k in keys) + " with one process")
        print("| members | sync every (events) | " + " | ".join(f"{k} | x 1 process" for k in keys)
              + " | syncs | sync MB |")
        print("|---:|---:|" + "---:|---:|" * len(keys) + "---:|---:|")
        ordered = sorted(rows, key=lambda r: (r["members"] != SWEEP_MEMBERS, r["members"],
                                              r["sync_every"] == 0, r["sync_every"]))
        for r in ordered:
            k = "never" if r["sync_every"] == 0 else f"{r['sync_every']:,}"
            print(f"| {r['members']} | {k} | " + " | ".join(f"{r[m]:.4f} | {r[m] / single[m]:.3f}" for m in keys)
                  + f" | {r['syncs']:,} | {r['sync_bytes'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
