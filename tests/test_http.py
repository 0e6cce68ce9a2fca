"""The HTTP side over real sockets, with the service consuming from the real broker."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import orjson
import pytest
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families
from recstream.stream.broker import free_port
from recstream.stream.config import ConfigError, load_config
from recstream.stream.metrics import Histogram, reason_label
from recstream.stream.service import RecStreamService
from recstream.stream.web import ServiceHttp

from conftest import cli_run_args, event, produce, read_all, service_config, service_thread, wait_for

OUTPUT_KEYS = {"user_id", "items", "index_version", "model_version", "generated_at", "last_event_ts"}


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def get_json(url: str) -> tuple[int, dict]:
    status, _, body = get(url)
    return status, orjson.loads(body)


def scrape(base: str) -> dict[str, list]:
    """Every sample of /metrics by sample name, as (labels, value) pairs."""
    status, ctype, body = get(base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(metrics: dict[str, list], name: str, **labels: str) -> float:
    return sum(v for got, v in metrics.get(name, []) if all(got.get(k) == w for k, w in labels.items()))


@contextmanager
def serving(config, on_flush=None, sample_interval_s: float = 2.0) -> Iterator[tuple[RecStreamService, str]]:
    """The service with its HTTP side started before ``run()`` (so readiness is seen from the start)."""
    service = RecStreamService(config, stop=threading.Event(), on_flush=on_flush)
    with ServiceHttp(service, sample_interval_s=sample_interval_s) as http, service_thread(service) as thread:
        yield service, http.address, thread


def http_config(bootstrap, topics, **overrides):
    return service_config(bootstrap, topics, **{"http.port": free_port(), **overrides})


@pytest.mark.kafka
def test_probes_metrics_and_queries_follow_the_stream(kafka_bootstrap, topics):
    config = http_config(kafka_bootstrap, topics, **{"output.top_k": 5})
    with serving(config) as (service, base, thread):
        # Before the loop runs: alive (just started) but not ready, and saying why.
        status, body = get_json(base + "/readyz")
        assert status == 503 and body["partitions_assigned"] is False
        assert get_json(base + "/healthz")[0] == 200
        thread.start()
        # Assigned, but no item yet and so no index: still not ready.
        wait_for(lambda: get_json(base + "/readyz")[1]["partitions_assigned"], what="assignment")
        status, body = get_json(base + "/readyz")
        assert status == 503 and body["index_loaded"] is False

        good = [event(f"u{n % 40}", f"i{n % 97}") for n in range(3000)]
        rated = [event(f"u{n % 40}", f"i{n % 31}", event_type="view", rating=float(1 + n % 5)) for n in range(500)]
        bad = [(b"k", b"{not json"), event("u1", "i1", event_type="teleport"), event("u2", "i2", event_type="warp")]
        produce(kafka_bootstrap, topics["input"], good + rated + bad)
        wait_for(lambda: service.stats.messages == len(good) + len(rated) + len(bad), what="all messages consumed")
        wait_for(lambda: get_json(base + "/readyz")[0] == 200, what="ready (an index loaded)")
        wait_for(lambda: value(scrape(base), "recstream_output_updates_total") > 0, what="updates published")

        m = scrape(base)
        assert value(m, "recstream_events_applied_total", kind="implicit") == len(good)
        assert value(m, "recstream_events_applied_total", kind="explicit") == len(rated)
        partitions = {labels["partition"] for labels, _ in m["recstream_events_applied_total"]}
        assert partitions <= {"0", "1", "2"} and len(partitions) >= 2  # keyed by user over 3 partitions
        assert value(m, "recstream_dead_letters_total", reason="invalid JSON") == 1
        assert value(m, "recstream_dead_letters_total", reason="unknown event_type") == 2
        assert value(m, "recstream_model_users") == 40 and value(m, "recstream_model_items") == 97
        assert value(m, "recstream_index_version") >= 1 and value(m, "recstream_index_items") >= 1
        assert value(m, "recstream_batch_apply_seconds_count") >= 1
        assert value(m, "recstream_freshness_seconds_count") >= 40  # every user's update observed
        assert value(m, "recstream_output_flush_seconds_count") >= 1
        assert value(m, "recstream_assigned_partitions") == 3
        assert {labels["partition"] for labels, _ in m["recstream_consumer_lag"]} == {"0", "1", "2"}

        # Metrics move as events flow.
        more = [event(f"new{n}", f"i{n % 97}") for n in range(700)]
        produce(kafka_bootstrap, topics["input"], more)
        wait_for(lambda: value(scrape(base), "recstream_events_applied_total") == len(good) + len(rated) + len(more),
                 what="the new events counted")
        m2 = scrape(base)
        assert value(m2, "recstream_model_users") == 40 + 700
        assert value(m2, "recstream_model_version") > value(m, "recstream_model_version")

        # /recommend: the output message's shape, the user's seen items left out, k respected.
        status, rec = get_json(base + "/recommend/u3?k=4")
        assert status == 200 and set(rec) == OUTPUT_KEYS and rec["user_id"] == "u3"
        assert len(rec["items"]) == 4
        scores = [x["score"] for x in rec["items"]]
        assert scores == sorted(scores, reverse=True)
        seen = {f"i{n % 97}" for n in range(3000) if n % 40 == 3} | {f"i{n % 31}" for n in range(500) if n % 40 == 3}
        assert not {x["item_id"] for x in rec["items"]} & seen
        published = [orjson.loads(msg.value()) for msg in read_all(kafka_bootstrap, topics["output"], expect=1)]
        assert set(published[0]) == set(rec)
        status, body = get_json(base + "/recommend/nobody")
        assert status == 404 and body["user_id"] == "nobody" and "unknown user" in body["error"]
        assert get_json(base + "/recommend/u3?k=0")[0] == 400
        assert get_json(base + "/recommend/u3?k=6")[0] == 400  # over output.top_k
        assert get_json(base + "/recommend/u3?k=x")[0] == 400

        # /similar: the live vectors' cosine, best first, the item itself left out. The stream is
        # quiet now, so the vectors cannot move between the answer and this check.
        status, sim = get_json(base + "/similar/i5?k=6")
        assert status == 200 and sim["item_id"] == "i5" and len(sim["items"]) == 6
        assert "i5" not in {x["item_id"] for x in sim["items"]}
        with service.model_lock:
            vectors = service.model.items.vectors.copy()
            row_of = service.model.items.ids.get
        q = vectors[row_of("i5")]
        for x in sim["items"]:
            v = vectors[row_of(x["item_id"])]
            assert x["score"] == pytest.approx(float(v @ q / np.linalg.norm(v) / np.linalg.norm(q)), abs=1e-5)
        sims = [x["score"] for x in sim["items"]]
        assert sims == sorted(sims, reverse=True)
        assert get_json(base + "/similar/nothing")[0] == 404
        assert get_json(base + "/nowhere")[0] == 404


def test_broker_command_runs_the_embedded_broker_with_topics():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "recstream.stream.cli", "broker", "--port", str(port),
                                "--topics", "--partitions", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert f"on 127.0.0.1:{port}".encode() in process.stdout.readline()  # printed once the topics exist
        metadata = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10).topics
        assert {t: len(m.partitions) for t, m in metadata.items() if not t.startswith("_")} == \
            {"clicks": 3, "recs": 3, "clicks.dlq": 1}
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err.decode()[-2000:]


@pytest.mark.kafka
def test_healthz_fails_while_the_loop_is_stuck(kafka_bootstrap, topics):
    stuck, release = threading.Event(), threading.Event()

    def on_flush(_service: RecStreamService) -> None:
        if stuck.is_set():  # a hang inside the loop, as a wedged call would be
            release.wait(60)

    config = http_config(kafka_bootstrap, topics, **{"http.liveness_timeout_s": 0.5})
    with serving(config, on_flush=on_flush) as (service, base, thread):
        thread.start()
        stopping = threading.Thread(target=lambda: (service.stop.wait(), release.set()), daemon=True)
        stopping.start()  # never leave the loop hung when the test ends, whatever failed
        produce(kafka_bootstrap, topics["input"], [event("u1", "i1")])
        wait_for(lambda: service.stats.events_applied == 1, what="the event applied")
        assert get_json(base + "/healthz")[0] == 200
        stuck.set()
        produce(kafka_bootstrap, topics["input"], [event("u2", "i2")])  # the next flush hangs
        wait_for(lambda: get_json(base + "/healthz")[0] == 503, what="/healthz to fail")
        status, body = get_json(base + "/healthz")
        assert body["status"] == "stuck" and body["loop_turn_age_s"] > 0.5
        assert get(base + "/metrics")[0] == 200  # the HTTP side still answers
        stuck.clear()
        release.set()
        wait_for(lambda: get_json(base + "/healthz")[0] == 200, what="/healthz to recover")


@pytest.mark.kafka
def test_run_creates_its_topics_and_serves_http_from_the_command_line(kafka_bootstrap):
    tag = uuid.uuid4().hex[:10]
    topics = {"input": f"new-{tag}", "output": f"new-recs-{tag}", "dlq": f"new-{tag}.dlq"}  # not created yet
    port = free_port()
    args = cli_run_args(kafka_bootstrap, topics, f"g-{tag}", "--http-port", str(port), "--create-topics",
                        "--partitions", "2")
    args.insert(args.index("run"), "--log-format=json")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def healthy() -> bool:
            try:
                return get(f"http://127.0.0.1:{port}/healthz")[0] == 200
            except OSError:
                return False

        wait_for(healthy, timeout_s=120, what="recstream run to serve /healthz")
        produce(kafka_bootstrap, topics["input"], [event("u1", "i1"), event("u1", "i2")])
        wait_for(lambda: value(scrape(f"http://127.0.0.1:{port}"), "recstream_events_applied_total") == 2,
                 timeout_s=120, what="the events in /metrics")
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()[-2000:]
    lines = [orjson.loads(line) for line in err.decode().splitlines()]  # every line is a JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["message"].startswith("HTTP on http://127.0.0.1:") for line in lines)
    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert len(metadata[topics["input"]].partitions) == 2 and len(metadata[topics["dlq"]].partitions) == 1
    # The fast group settings are given with -X: each went to its own client, so no client warned.
    assert not [line for line in lines if "CONFWARN" in line["message"]]


def test_histogram_buckets_are_cumulative_and_le():
    h = Histogram("x_seconds", "doc", (0.1, 1.0))
    h.observe(np.array([0.05, 0.1, 0.5, 2.0, 3.0]))
    h.observe(1.0)
    family = h.family()
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.1": 2, "1.0": 4, "+Inf": 6}
    assert {s.name: s.value for s in family.samples}["x_seconds_sum"] == pytest.approx(6.65)


def test_dead_letter_reasons_are_bounded_labels():
    assert reason_label("invalid JSON: unexpected character: line 1 column 2 (char 1)") == "invalid JSON"
    assert reason_label("rating 7.0 outside [-1000, 1000]") == "rating N.N outside"
    assert reason_label("") == "other"


def test_http_settings_are_checked():
    assert load_config(overrides={"http.port": "8080"}).http.port == 8080
    with pytest.raises(ConfigError, match="http.port: must be a TCP port"):
        load_config(overrides={"http.port": 70000})
    with pytest.raises(ConfigError, match="http.liveness_timeout_s"):
        load_config(overrides={"http.liveness_timeout_s": 0})


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _render(browser: str, url: str) -> str:
    """The page's DOM after its scripts ran (a real headless browser; virtual time lets the timers fire)."""
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--virtual-time-budget=5000", "--dump-dom", url],
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return result.stdout.decode().split("<script>")[0]  # what the script drew, not its source


def _number(dom: str, key: str) -> int:
    found = re.search(rf'data-key="{key}">([0-9,]+)<', dom)
    assert found, f"{key} not shown"
    return int(found.group(1).replace(",", ""))


@pytest.mark.kafka
@pytest.mark.skipif(_chromium() is None, reason="no headless browser: apt-get install chromium to test the page")
def test_status_page_draws_its_charts_and_numbers_move(kafka_bootstrap, topics):
    config = http_config(kafka_bootstrap, topics)
    stop_producing = threading.Event()

    def stream() -> None:  # a steady trickle of clicks while the page is looked at (bounded)
        for n in range(600):
            if stop_producing.wait(0.1):
                return
            produce(kafka_bootstrap, topics["input"], [event(f"u{(n * 7 + j) % 50}", f"i{(n + j) % 80}")
                                                         for j in range(20)])

    with serving(config, sample_interval_s=0.5) as (service, base, thread):
        thread.start()
        producer = threading.Thread(target=stream)
        producer.start()
        try:
            wait_for(lambda: get_json(base + "/readyz")[0] == 200, what="ready")
            wait_for(lambda: len(get_json(base + "/status.json")[1]["history"]) >= 3, what="three samples")
            status, ctype, body = get(base + "/")
            assert status == 200 and ctype.startswith("text/html")
            assert b"http://" not in body and b"https://" not in body  # nothing loaded from elsewhere

            first = _render(_chromium(), base + "/")
            assert re.search(r'<span id="err">(.*?)</span>', first).group(1) == ""  # the page's own error line
            for chart in ("chart-throughput", "chart-freshness"):
                svg = re.search(rf'<svg id="{chart}".*?</svg>', first, re.S)
                assert svg, chart
                drawn = [int(n) for n in re.findall(r'data-points="(\d+)"', svg.group(0))]
                assert drawn and max(drawn) >= 2, (chart, drawn)  # a line, not a dot
            assert _number(first, "events_applied") > 0 and _number(first, "index_version") >= 1
            assert first.count('class="recs"') == 3  # three users' recommendations

            seen = _number(first, "events_applied")
            wait_for(lambda: service.stats.events_applied > seen, what="more events")
            second = _render(_chromium(), base + "/")
            assert _number(second, "events_applied") > seen
        finally:
            stop_producing.set()
            producer.join()
