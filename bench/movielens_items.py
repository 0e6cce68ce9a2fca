"""Write MovieLens item metadata (genres, user tags, title) as item-metadata JSON lines.

    python bench/movielens_items.py ../shared/data/ml-latest-small /tmp/ml-items.jsonl [--no-tags]

The output is the format of the item-metadata topic and of ``--item-metadata``:
``{"item_id": ..., "features": {"genres": [...], "tags": [...]}, "text": title}``.
Written outside the project: the data's licence does not let us bundle it.
``--no-tags`` leaves out the user tags: MovieLens users apply them over time, so
giving every tag up front leaks a little of the future into a prequential run;
genres and titles are known when a movie appears.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import orjson


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    tags: dict[str, set[str]] = defaultdict(set)
    if "--no-tags" not in sys.argv[3:]:
        with open(source / "tags.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                tags[row["movieId"]].add(row["tag"].strip().lower())
    with open(source / "movies.csv", newline="", encoding="utf-8") as f, open(out, "wb") as w:
        for row in csv.DictReader(f):
            genres = [g for g in row["genres"].split("|") if g != "(no genres listed)"]
            w.write(orjson.dumps({"item_id": row["movieId"], "text": row["title"],
                                  "features": {"genres": genres, **({"tags": sorted(tags[row["movieId"]])}
                                                                    if tags else {})}}) + b"\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
