"""The Faust path's throughput against `recstream run`'s, on the same events, in one invocation.

Both consume the same pre-produced synthetic stream from the embedded broker: the example Faust app
(examples/faust_app.py: aiokafka, stream.take(1000, within=0.5), one model update per batch)
timed from its first applied event to its last, and the service (bench/throughput.py's
end_to_end, learning only, the same steady-state measure). Needs pip install 'recstream[faust]'.

    python bench/faust_throughput.py [--events 200000] [--repeats 2]
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
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from recstream.stream.broker import EmbeddedBroker, create_topics, free_port, produce_all  # noqa: E402
from recstream.stream.synthetic import SyntheticClickstream  # noqa: E402
from throughput import end_to_end  # noqa: E402

ROOT = Path(__file__).parent.parent


def _applied(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/", timeout=5) as response:
            return json.loads(response.read())["events_applied"]
    except OSError:
        return None


def faust_run(bootstrap: str, messages) -> dict:

    tag = uuid.uuid4().hex[:8]
    topic = f"faust-bench-{tag}"
    create_topics(bootstrap, {topic: 4})
    produce_all(bootstrap, topic, messages)
    port = free_port()
    env = {**os.environ, "KAFKA_BROKER": f"kafka://{bootstrap}", "CLICKS_TOPIC": topic,
           "FAUST_APP_ID": f"faust-bench-{tag}", "FAUST_SESSION_TIMEOUT_S": "4", "FAUST_HEARTBEAT_S": "0.5"}
    with tempfile.TemporaryDirectory() as datadir:
        worker = subprocess.Popen([sys.executable, "-m", "faust", "--datadir", datadir, "-A", "examples.faust_app",
                                   "worker", "-l", "error", "--web-port", str(port), "--web-host", "127.0.0.1"],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            first = first_n = None
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                n = _applied(port)
                if n and first is None:
                    first, first_n = time.perf_counter(), n
                if n is not None and n >= len(messages):
                    done = time.perf_counter()
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError("the Faust app did not apply every event within 30 minutes")
        finally:
            worker.terminate()
            worker.wait(60)
    return {"steady_events_per_s": (len(messages) - first_n) / (done - first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/faust.json")
    args = parser.parse_args()
    messages = SyntheticClickstream(n_users=50_000, n_items=10_000, seed=0).events(args.events).messages()
    runs: dict[str, list] = {"recstream_run": [], "faust_app": []}
    with EmbeddedBroker() as bootstrap:
        end_to_end(bootstrap, messages[: len(messages) // 4], 32, publish=False)  # warm-up: compiles, caches
        for r in range(args.repeats):
            runs["recstream_run"].append(end_to_end(bootstrap, messages, 32, publish=False))
            runs["faust_app"].append(faust_run(bootstrap, messages))
            print(f"run {r + 1}/{args.repeats}: recstream run {runs['recstream_run'][-1]['steady_events_per_s']:,.0f}/s,"
                  f" Faust app {runs['faust_app'][-1]['steady_events_per_s']:,.0f}/s", flush=True)
    service = statistics.median(r["steady_events_per_s"] for r in runs["recstream_run"])
    faust = statistics.median(r["steady_events_per_s"] for r in runs["faust_app"])
    result = {"command": " ".join(["python", *sys.argv]), "events": args.events, "repeats": args.repeats,
              "median_steady_events_per_s": {"recstream_run": service, "faust_app": faust},
              "ratio_faust_to_service": faust / service, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"Faust app / recstream run: {faust / service:.2f}; written to {args.out}")


if __name__ == "__main__":
    main()
