"""Logging: librdkafka's lines through ``logging`` and folded, settings routed per client, JSON lines."""

from __future__ import annotations

import logging
import subprocess
import sys

import orjson
from confluent_kafka import Producer
from recstream.stream.broker import free_port
from recstream.stream.logs import KAFKA_LOGGER_NAME, RepeatFilter
from recstream.stream.service import RecStreamService

from conftest import service_config


def _records(filter_: RepeatFilter, messages: list[tuple[str, tuple]]) -> list[str]:
    out = []
    for msg, args in messages:
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, msg, args, None)
        if filter_.filter(record):
            out.append(record.getMessage())
    return out


def test_repeats_are_folded_and_counted():
    now = [0.0]
    f = RepeatFilter(window_s=60, clock=lambda: now[0])
    same = [("Connect to %s failed (after %dms)", ("127.0.0.1:9092", n)) for n in range(5)]
    assert _records(f, same) == ["Connect to 127.0.0.1:9092 failed (after 0ms)"]
    assert _records(f, [("other news", ())]) == ["other news"]  # a different message is not held back
    now[0] = 61.0
    assert _records(f, same[:1]) == ["Connect to 127.0.0.1:9092 failed (after 0ms) (and 4 more like it in the last 60s)"]
    assert _records(f, same[:1]) == []


def test_librdkafka_lines_arrive_through_logging(caplog):
    # The service's own producer settings, pointed at a port where nothing listens: librdkafka
    # reports a failed connect every few ms; they must arrive as records, folded to one.
    logging.getLogger(KAFKA_LOGGER_NAME).filters.clear()  # forget what earlier tests' clients said
    config = service_config(f"127.0.0.1:{free_port()}", {"input": "in", "output": "out", "dlq": "in.dlq"})
    producer = Producer(RecStreamService(config)._client_configs()[1])
    with caplog.at_level(logging.DEBUG, logger=KAFKA_LOGGER_NAME):
        for _ in range(10):
            producer.poll(0.2)
    failures = [r for r in caplog.records if r.name == KAFKA_LOGGER_NAME and "Connect to" in r.getMessage()]
    assert len(failures) == 1
    # The fast group settings are consumer settings given for both clients: routed, so no warning.
    assert not [r for r in caplog.records if "CONFWARN" in r.getMessage()]


def test_json_log_lines():
    code = ("import logging; from recstream.stream.logs import setup_logging; setup_logging('INFO', 'json'); "
            "logging.getLogger('recstream.x').warning('lag %d on %s', 5, 'clicks/0')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stderr.decode()
    line = orjson.loads(err.strip())
    assert line["level"] == "WARNING" and line["logger"] == "recstream.x" and line["message"] == "lag 5 on clicks/0"


def test_status_line_waits_for_assignment_then_gives_rates_and_totals():
    from recstream.stream.logs import StatusLog

    config = service_config("127.0.0.1:9", {"input": "in", "output": "out", "dlq": "in.dlq"})
    service = RecStreamService(config)
    status = StatusLog(service, interval_s=10)
    assert status.line().startswith(f"waiting for partition assignment (group {config.topics.group_id}")
    service.stats.assigned = [("in", 0)]
    service.stats.events_applied = 500
    service.stats.dead_letters = 3
    line = status.line()
    assert "events=500 (+500 in " in line and "dead_letters=3 (+3)" in line and "partitions=1" in line
    service.stats.events_applied = 800
    assert "events=800 (+300 in " in status.line()


def test_help_shows_defaults_and_an_example_for_every_command():
    from recstream.stream.cli import EXAMPLES, build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(EXAMPLES)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "example:\n  recstream " + name in text
    assert "default: 4" in commands["topics"].format_help() and "(default: 9092)" in commands["broker"].format_help()
