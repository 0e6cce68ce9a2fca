"""Learning quality against the baselines, the README's table: bench/results/quality-*.json.

    python bench/quality.py ../shared/data [RUN ...]   (RUN: only these rows, e.g. yoochoose-session)

Runs ``recstream eval`` once per row, one after the other, each with its
baseline in the same invocation on the same events:

- MovieLens latest-small, explicit, prequential, time order (river BiasedMF);
- MovieLens latest-small, implicit, prequential, time order (popularity so far);
- Last.fm 2K, per-user seeded 80/20 split, 10 passes, defaults (implicit ALS);
- the same split, 40 passes with settings tuned for that log (implicit ALS), on three seeded
  splits (0, 1, 2), since the two are close;
- YOOCHOOSE 100k, both files in time order, the session protocol: next-click HR/MRR@20 against
  popularity, SR and V-SKNN (the ratio is against the best of them on each metric).

Prints a table of each result against its baseline with the ratio.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ML = ["--ts-unit", "s", "--order", "time"]
LASTFM = ["--delimiter", "tab", "--mode", "implicit", "--protocol", "split",
          "--columns", "user_id=userID,item_id=artistID,weight=weight", "--weight-transform", "log1p"]
LASTFM_TUNED = ["--epochs", "40", "--set", "model.dim=64", "--set", "model.regularization=0.02",
                "--set", "model.negative_pool=65536", "--set", "model.popularity_weight=0.7"]


def runs(data: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    ratings = str(data / "ml-latest-small" / "ratings.csv")
    plays = str(data / "hetrec2011-lastfm-2k" / "user_artists.dat")
    clicks = [str(data / "yoochoose-100k" / f"yoochoose-clicks-100k_{part}.txt") for part in ("train_full", "test")]
    return {
        "ml-explicit": (["--events", ratings, *ML, "--mode", "explicit",
                         "--columns", "user_id=userId,item_id=movieId,rating=rating,ts=timestamp"],
                        ("mae", "rmse", "events_per_s")),
        "ml-implicit": (["--events", ratings, *ML, "--mode", "implicit",
                         "--columns", "user_id=userId,item_id=movieId,ts=timestamp"],
                        ("hit_rate@10", "ndcg@10")),
        "lastfm-split": (["--events", plays, *LASTFM, "--epochs", "10"], ("ndcg@10", "recall@10")),
        **{f"lastfm-split-tuned{'' if seed == 0 else f'-seed{seed}'}":
           (["--events", plays, *LASTFM, *LASTFM_TUNED, "--seed", str(seed)], ("ndcg@10", "recall@10"))
           for seed in (0, 1, 2)},
        "yoochoose-session": (["--events", *clicks, "--delimiter", "tab", "--columns",
                               "user_id=SessionId,item_id=ItemId,ts=Time", "--ts-unit", "s", "--order", "time",
                               "--mode", "implicit", "--protocol", "session"],
                              ("hr@20", "mrr@20", "hr@20_new", "mrr@20_new", "events_per_s", "events_per_cpu_s")),
    }


def main() -> None:
    data, only = Path(sys.argv[1]), set(sys.argv[2:])
    recstream = Path(sys.executable).parent / "recstream"
    rows = []
    for name, (args, keys) in runs(data).items():
        if only and name not in only:
            continue
        out = HERE / "results" / f"quality-{name}.json"
        command = [str(recstream), "eval", *args, "--json-out", str(out)]
        print(f"== {name}: {shlex.join(command)}", flush=True)
        subprocess.run(command, check=True)
        result = json.loads(out.read_text())
        result["command"] = shlex.join(["recstream", "eval", *args])
        out.write_text(json.dumps(result, indent=2) + "\n")
        for key in keys:
            if "baselines" in result:  # several baselines: the best of them on this metric
                best = max(result["baselines"], key=lambda b: result["baselines"][b][key])
                rows.append((name, key, result[key], result["baselines"][best][key], best))
                continue
            ours, theirs = result[key], result["baseline"].get(key)
            rows.append((name, key, ours, theirs, result.get("baseline_name", "")))
    print(f"\n{'run':<20} {'metric':<14} {'recstream':>12} {'baseline':>12} {'ratio':>7}  baseline is")
    for name, key, ours, theirs, baseline in rows:
        ratio = f"{ours / theirs:.3f}" if theirs else "-"
        print(f"{name:<20} {key:<14} {ours:>12.4f} {theirs if theirs is not None else float('nan'):>12.4f} "
              f"{ratio:>7}  {baseline}")


if __name__ == "__main__":
    main()
