"""Cold-start quality on MovieLens with and without item content: bench/results/quality-hybrid.json.

    python bench/hybrid_quality.py ../shared/data/ml-latest-small [bench/results/quality-hybrid.json]

Runs ``recstream eval`` (implicit, prequential, time order) once per variant, one
after the other: no content, hashed genres + title, hashed genres + tags + title,
MiniLM title + genres (needs the ``text`` extra). The no-content numbers are the
baseline the first run computes beside itself. ``hit_rate@10_cold`` covers
events on items with fewer than 5 earlier events; ``hit_rate@10_warm`` the rest.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ("hit_rate@10_cold", "hit_rate@10_warm", "hit_rate@10", "cold_events", "events_evaluated", "events_per_s")


def main() -> None:
    data = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "results" / "quality-hybrid.json"
    recstream = Path(sys.executable).parent / "recstream"
    tmp = Path(tempfile.mkdtemp(prefix="recstream-hybrid-"))
    items = {"tags": tmp / "items.jsonl", "no-tags": tmp / "items-no-tags.jsonl"}
    for name, path in items.items():
        subprocess.run([sys.executable, str(HERE / "movielens_items.py"), str(data), str(path)]
                       + (["--no-tags"] if name == "no-tags" else []), check=True)
    base = [str(recstream), "eval", "--events", str(data / "ratings.csv"), "--ts-unit", "s", "--order", "time",
            "--mode", "implicit", "--columns", "user_id=userId,item_id=movieId,ts=timestamp"]
    variants = {
        "hashed(genres+title)": ["--item-metadata", str(items["no-tags"])],
        "hashed(genres+tags+title)": ["--item-metadata", str(items["tags"]), "--baseline", "none"],
        "minilm(title)+genres": ["--item-metadata", str(items["no-tags"]), "--baseline", "none",
                                 "--set", "content.text_encoder=minilm"],
    }
    results: dict[str, dict] = {}
    for name, extra in variants.items():
        json_out = tmp / "out.json"
        command = base + extra + ["--json-out", str(json_out)]
        print(f"== {name}", flush=True)
        subprocess.run(command, check=True)
        run = json.loads(json_out.read_text())
        if "baseline" in run:
            results["none"] = {"command": shlex.join(command) + "  (its baseline)",
                               **{k: run["baseline"][k] for k in KEYS if k in run["baseline"]}}
        results[name] = {"command": shlex.join(command), **{k: run[k] for k in KEYS if k in run}}
    report = {
        "data": str(data),
        "protocol": "implicit prequential in time order: rank among existing items, then learn",
        "cold": "events on items with fewer than 5 earlier events; unrankable first events count as misses",
        "items_file": f"python bench/movielens_items.py {data} ITEMS [--no-tags]",
        "note": "tags.csv tags are applied over time: using them all up front leaks a little of the future",
        "variants": results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    for name, r in results.items():
        print(f"{name:<28} cold HR@10 {r['hit_rate@10_cold']:.4f}  warm HR@10 {r['hit_rate@10_warm']:.4f}")


if __name__ == "__main__":
    main()
