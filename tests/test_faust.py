"""The Faust example app on the real broker: it learns from its topic and answers from its web view."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from recstream.stream.broker import create_topics, free_port

from conftest import event, produce, wait_for

pytest.importorskip("faust", reason="Faust path not installed: pip install 'recstream[faust]' (make test-faust)")

ROOT = Path(__file__).parent.parent


def _get(url: str) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())
    except OSError:
        return 0, None


@pytest.mark.kafka
def test_faust_example_learns_from_its_stream_and_serves_recommendations(kafka_bootstrap, tmp_path):
    tag = uuid.uuid4().hex[:10]
    topic = f"faust-clicks-{tag}"
    create_topics(kafka_bootstrap, {topic: 2})
    port = free_port()
    env = {**os.environ, "KAFKA_BROKER": f"kafka://{kafka_bootstrap}", "CLICKS_TOPIC": topic,
           "FAUST_APP_ID": f"recstream-faust-{tag}", "FAUST_SESSION_TIMEOUT_S": "4", "FAUST_HEARTBEAT_S": "0.5"}
    worker = subprocess.Popen([sys.executable, "-m", "faust", "--datadir", str(tmp_path / "faust"),
                               "-A", "examples.faust_app", "worker", "-l", "warn", "--web-port", str(port),
                               "--web-host", "127.0.0.1"],
                              cwd=ROOT, env=env, stdout=(tmp_path / "worker.log").open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert worker.poll() is None, "the Faust worker exited"
            return _get(base + "/stats/")[0] == 200

        wait_for(up, timeout_s=120, what="the Faust worker's web view")
        events = [event(f"u{n % 10}", f"i{(n * 7) % 300}") for n in range(2000)] + [(b"x", b"{broken")]
        produce(kafka_bootstrap, topic, events)
        wait_for(lambda: _get(base + "/stats/")[1]["events_applied"] == 2000, timeout_s=120,
                 what="the app to learn every event")
        status, stats = _get(base + "/stats/")
        assert stats["users"] == 10 and stats["items"] == 300 and stats["rejected"] == {"invalid JSON": 1}
        status, message = _get(base + "/recommend/u3/?k=5")
        assert status == 200 and message["user_id"] == "u3" and len(message["items"]) == 5
        assert set(message) == {"user_id", "items", "index_version", "model_version", "generated_at",
                                "last_event_ts"}
        seen = {f"i{(n * 7) % 300}" for n in range(2000) if n % 10 == 3}  # 200 of the 300 items
        assert not {x["item_id"] for x in message["items"]} & seen
        assert _get(base + "/recommend/nobody/")[0] == 404
    except AssertionError:
        print((tmp_path / "worker.log").read_text()[-5000:])  # the worker's side of the story
        raise
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    output = (tmp_path / "worker.log").read_text()
    assert worker.returncode == 0 and "Traceback" not in output, output[-3000:]
