"""Configuration: defaults, overrides and start-up errors that name the field."""

import subprocess
import sys

import pytest
from recstream.stream.config import ConfigError, load_config


def test_file_and_overrides(tmp_path):
    path = tmp_path / "recstream.toml"
    path.write_text(
        '[kafka]\n"security.protocol" = "SASL_SSL"\n"session.timeout.ms" = 45000\n'
        '[kafka.consumer]\n"fetch.max.bytes" = 1048576\n'
        '[model]\ndim = 48\n[events.weights]\nview = 0.2\nclick = 1\n'
    )
    cfg = load_config(path, {"model.learning_rate": "0.01", "kafka.bootstrap.servers": "h:9092"})
    assert cfg.model.dim == 48 and cfg.model.learning_rate == 0.01
    assert cfg.kafka == {"security.protocol": "SASL_SSL", "session.timeout.ms": "45000", "bootstrap.servers": "h:9092"}
    assert cfg.kafka_consumer == {"fetch.max.bytes": "1048576"}
    assert cfg.events.weights == {"view": 0.2, "click": 1}
    assert cfg.topics.dlq == "clicks.dlq"


@pytest.mark.parametrize("overrides, field", [
    ({"model.dim": "-3"}, "model.dim"),
    ({"model.dim": "many"}, "model.dim"),
    ({"model.learning_rate": "0"}, "model.learning_rate"),
    ({"model.learning_rate": "nan"}, "model.learning_rate"),
    ({"model.dimension": 3}, "model.dimension: unknown setting"),
    ({"output.top_k": 0}, "output.top_k"),
    ({"output.exclude_seen": "maybe"}, "output.exclude_seen"),
    ({"topics.input": ""}, "topics.input"),
    ({"events.weights": {"click": -1}}, "events.weights"),
    ({"events.default_event_type": "tap"}, "events.default_event_type"),
    ({"index.rebuild_changed_fraction": 2}, "index.rebuild_changed_fraction"),
    ({"model.rating_replay_steps": -1}, "model.rating_replay_steps"),
    ({"model.rating_replay_steps": 1.5}, "model.rating_replay_steps"),
    ({"model.rating_replay_pool": 0}, "model.rating_replay_pool"),
    ({"model.rating_replay_pool": 10**12}, "model.rating_replay_pool"),
    ({"model.rating_replay_learning_rate": "nan"}, "model.rating_replay_learning_rate"),
    ({"model.rating_replay_regularization": -0.1}, "model.rating_replay_regularization"),
    ({"model.short_term_weight": -3}, "model.short_term_weight"),
    ({"model.short_term_half_life_s": -1}, "model.short_term_half_life_s"),
    ({"model.short_term_keep": 5}, "model.short_term_keep"),
    ({"colour": "blue"}, "colour: unknown setting"),
    ({"content.text_encoder": "bert"}, "content.text_encoder: must be hashed or minilm"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_bad_toml_is_reported(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model\ndim = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_cli_stops_on_bad_config_with_the_field_name(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "recstream.stream.cli", "run", "--bootstrap-servers", "127.0.0.1:1",
         "--set", "model.dim=0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "model.dim: must be an integer from 1 to 4096, got 0" in result.stderr


def test_cli_requires_bootstrap_servers():
    result = subprocess.run([sys.executable, "-m", "recstream.stream.cli", "run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "kafka.bootstrap.servers: required" in result.stderr


@pytest.mark.parametrize("command", ["eval", "replay"])
def test_cli_names_the_flag_when_a_log_lacks_the_columns_or_is_missing(tmp_path, command):
    log = tmp_path / "ratings.csv"
    log.write_text("userId,movieId,rating\n1,10,4.0\n")
    cli = [sys.executable, "-m", "recstream.stream.cli", command, "--events"]
    unmapped = subprocess.run(cli + [str(log)], capture_output=True, text=True, timeout=60)
    assert unmapped.returncode == 2 and "Traceback" not in unmapped.stderr
    assert "--columns: " in unmapped.stderr and "no column(s) ['user_id', 'item_id']" in unmapped.stderr
    missing = subprocess.run(cli + [str(tmp_path / "nope.csv")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--events: " in missing.stderr and "is not a file" in missing.stderr
    mapped = subprocess.run(cli + [str(log), "--columns", "user_id=userId,item_id=movieId,rating=rating"]
                            + (["--baseline", "none", "--mode", "explicit"] if command == "eval" else ["--quiet"]),
                            capture_output=True, text=True, timeout=120)
    assert mapped.returncode == 0, mapped.stderr


def test_kafka_secrets_from_the_environment_or_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("RS_TEST_KAFKA_PASSWORD", "from-env")
    secret = tmp_path / "password"
    secret.write_text("from-file\n")  # as a mounted Kubernetes secret, with its newline
    cfg = load_config(overrides={"kafka.sasl.password": "${env:RS_TEST_KAFKA_PASSWORD}",
                                 "kafka.producer.ssl.key.password": f"${{file:{secret}}}",
                                 "kafka.sasl.username": "plain"})
    assert cfg.kafka["sasl.password"] == "from-env" and cfg.kafka["sasl.username"] == "plain"
    assert cfg.kafka_producer["ssl.key.password"] == "from-file"
    monkeypatch.delenv("RS_TEST_KAFKA_PASSWORD")
    with pytest.raises(ConfigError, match="kafka.sasl.password: environment variable RS_TEST_KAFKA_PASSWORD is not set"):
        load_config(overrides={"kafka.sasl.password": "${env:RS_TEST_KAFKA_PASSWORD}"})
    with pytest.raises(ConfigError, match="kafka.sasl.password: cannot read /nonexistent/pw"):
        load_config(overrides={"kafka.sasl.password": "${file:/nonexistent/pw}"})


def test_every_setting_is_documented_in_the_readme_configuration_table():
    """The README's table is the settings' user documentation: a setting missing there is invisible."""
    import dataclasses
    import re
    from pathlib import Path

    from recstream.stream.config import _SECTIONS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        names = re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", row.split("|")[1])
        section = next((n.split(".")[0] for n in names if "." in n), None)
        documented |= {n if "." in n or section is None else f"{section}.{n}" for n in names}
    settings = {f"{name}.{f.name}" for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    assert not settings - documented, sorted(settings - documented)
