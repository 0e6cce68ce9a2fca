"""The catch-up with publishing of ``bench/scale.py``, two commits against each other, in one invocation.

Machines are noisy from one sitting to the next, so a change to the rounds is measured against
the code before it on the same broker, the same pre-produced stream and alternating runs:

    python bench/ab_catch_up.py BEFORE AFTER [--repeats 2] [--users 1000000 --items 1000000 --events 2000000]

Each commit is checked out into a temporary git worktree; the service children import recstream
from there (a ``sitecustomize`` on their path sets the editable install aside). Prints each run and
the medians; writes ``bench/results/ab-catch-up.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import scale  # noqa: E402  (bench/ is not a package)
from recstream.stream.broker import EmbeddedBroker, create_topics  # noqa: E402
from recstream.stream.synthetic import SyntheticClickstream, SyntheticEvents  # noqa: E402

_SITECUSTOMIZE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")
                    and "__editable__" not in getattr(f, "__name__", "")]
"""
KEPT = ("events_per_s", "steady_events_per_s", "seconds", "updates_published", "output_per_event", "index_builds")


def checkout(repo: Path, commit: str, into: Path) -> Path:
    """A worktree of ``commit`` and beside it a directory to import it from as ``recstream``."""
    tree, shim = into / f"tree-{commit}", into / f"shim-{commit}"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "-q", "--detach", str(tree), commit], check=True)
    (shim / "recstream").mkdir(parents=True)
    (shim / "recstream" / "__init__.py").write_text((repo / "recstream" / "__init__.py").read_text())
    for package in ("embeddings", "index", "stream", "evaluation"):
        (shim / "recstream" / package).symlink_to(tree / package)
    (shim / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return shim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=str(HERE / "results" / "ab-catch-up.json"))
    args = parser.parse_args()
    repo = HERE.parent
    n = args.events
    gen = SyntheticClickstream(n_users=args.users, n_items=args.items, seed=0, zipf_exponent=1.0,
                               user_zipf_exponent=0.8, start_ms=int(time.time() * 1000) - n)
    ev = gen.events(n)
    messages = SyntheticEvents(ev.users, ev.items, ev.event_types, ev.ts).messages()
    runs: dict[str, list[dict]] = {args.before: [], args.after: []}
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp, EmbeddedBroker() as bootstrap:
        shims = {commit: checkout(repo, commit, Path(tmp)) for commit in runs}
        os.chdir(tmp)  # (``python -m`` children put the working directory first on their path: not the repo's)
        try:
            topic = f"ab-{uuid.uuid4().hex[:6]}"
            create_topics(bootstrap, {topic: 4})
            scale.produce(bootstrap, topic, messages)
            warm = f"ab-warm-{uuid.uuid4().hex[:6]}"  # numba compiles each worktree's kernels once, here
            create_topics(bootstrap, {warm: 4})
            scale.produce(bootstrap, warm, messages[:20_000])
            for shim in shims.values():
                os.environ["PYTHONPATH"] = str(shim)
                sys.path[:] = [str(shim)] + [p for p in sys.path if p not in map(str, shims.values())]
                scale.catch_up(bootstrap, warm, 20_000, True, args.timeout)
            for r in range(args.repeats):
                for commit, shim in shims.items():
                    # A spawned child starts with this path (and this environment's PYTHONPATH, which
                    # runs the shim's sitecustomize): it imports recstream from the worktree.
                    os.environ["PYTHONPATH"] = str(shim)
                    sys.path[:] = [str(shim)] + [p for p in sys.path if p not in map(str, shims.values())]
                    result = scale.catch_up(bootstrap, topic, n, True, args.timeout)
                    runs[commit].append({k: result.get(k) for k in KEPT})
                    print(f"run {r + 1} {commit}: {json.dumps(runs[commit][-1])}", flush=True)
        finally:
            for commit in runs:
                subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(Path(tmp) / f"tree-{commit}")],
                               check=False)
    medians = {commit: {k: statistics.median(run[k] for run in rows) for k in KEPT} for commit, rows in runs.items()}
    pairs = [b["steady_events_per_s"] / a["steady_events_per_s"] for a, b in zip(runs[args.before], runs[args.after])]
    summary = {"medians": medians, "steady_ratio_per_repeat": pairs,
               "steady_ratio_of_medians": medians[args.after]["steady_events_per_s"]
               / medians[args.before]["steady_events_per_s"]}
    result = {"command": " ".join([sys.executable, *sys.argv]), "machine": scale.machine(), "runs": runs,
              "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| commit | steady events/s | total events/s | updates per event | index builds |")
    print("|---|---:|---:|---:|---:|")
    for commit, m in medians.items():
        print(f"| {commit} | {m['steady_events_per_s']:,.0f} | {m['events_per_s']:,.0f} | "
              f"{m['output_per_event']:.3f} | {m['index_builds']:.0f} |")
    print(f"after / before, steady: {summary['steady_ratio_of_medians']:.2f} (per repeat "
          f"{', '.join(f'{p:.2f}' for p in pairs)}) -> {args.out}")


if __name__ == "__main__":
    main()
