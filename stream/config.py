"""Service configuration: a TOML file, overridden by command-line flags, checked at start-up.

Every check names the field it rejects, so a bad config stops start-up with a
message a person can act on. Unknown keys are errors too: a typo that would
silently fall back to a default is worse than a refusal.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
from recstream.embeddings.model import MFConfig
from recstream.embeddings.text import TEXT_ENCODERS, MiniLMText
from recstream.index.refresh import IndexConfig


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


@dataclass(frozen=True)
class TopicsConfig:
    input: str = "clicks"
    output: str = "recs"
    dead_letter: str = ""  # empty: "<input>.dlq"
    group_id: str = "recstream"
    # Where to start reading a partition the checkpoint knows nothing of:
    # "committed" (the group's offset, else auto.offset.reset), "earliest", "latest", or epoch ms.
    start_from: str = "committed"
    # Optional topic of item metadata ({"item_id", "features", "text"}): content vectors for cold items.
    item_metadata: str = ""

    @property
    def dlq(self) -> str:
        return self.dead_letter or f"{self.input}.dlq"


@dataclass(frozen=True)
class EventsConfig:
    """How input messages become events."""

    weights: dict[str, float] = field(default_factory=lambda: {"view": 0.5, "click": 1.0, "cart": 2.0, "purchase": 3.0})
    default_event_type: str = "click"
    max_message_bytes: int = 65536
    max_id_length: int = 256
    # Ratings outside [rating_min, rating_max] are dead letters. Wide by default (it covers 1-5,
    # 0-10, 0-100 and +-100 scales); set it to the stream's scale to catch broken producers.
    rating_min: float = -100.0
    rating_max: float = 100.0
    # An event time more than this after its record's timestamp is taken as a clock accident and
    # replaced by the record's time (see stream/clock.py); "now" never passes the wall clock by more.
    clock_tolerance_s: float = 300.0


@dataclass(frozen=True)
class OutputConfig:
    # False: learn and commit only, publish nothing (backfills, and measuring the learning path).
    publish: bool = True
    top_k: int = 10
    exclude_seen: bool = True
    history_per_user: int = 500
    # At most one update per user per interval, and a round publishes for at most one interval
    # (the users left go first in the next); offsets are committed at the same cadence, after
    # the updates of the round are delivered.
    flush_interval_s: float = 1.0
    # While the consumer is behind, publishing takes at most this share of the time (the
    # longest-waiting users first, the rest wait): a backlog is read at least this fast, and
    # each user's final state is published once it is (see stream/publishing.py).
    max_publish_share: float = 0.5
    # A round starts early once this many users are pending (unless the consumer is behind).
    max_pending_users: int = 50_000
    delivery_timeout_s: float = 30.0


@dataclass(frozen=True)
class CheckpointConfig:
    """Used only with a state dir: then the checkpoint is the source of truth for offsets."""

    interval_s: float = 30.0
    events: int = 2_000_000
    keep: int = 2


@dataclass(frozen=True)
class ContentConfig:
    """Cold-start items from their metadata (used when topics.item_metadata is set)."""

    refresh_interval_s: float = 60.0  # refit features -> vectors and refresh placeholders this often
    cold_count: int = 5  # the regression learns from items with at least this many events
    # How item text becomes features: "hashed" (bag of words, no model) or "minilm"
    # (sentence embeddings; needs the optional extra: pip install 'recstream[text]').
    text_encoder: str = "hashed"


@dataclass(frozen=True)
class MonitorConfig:
    """When to say "retrain/reindex recommended"."""

    adwin_delta: float = 0.002  # ADWIN confidence on the batch-mean prequential loss
    item_drift_threshold: float = 0.3  # mean cosine distance of item vectors between index builds


@dataclass(frozen=True)
class LoopConfig:
    batch_size: int = 10_000
    poll_timeout_s: float = 0.2
    status_interval_s: float = 10.0
    # How long start-up waits for the Kafka cluster (retrying with backoff) before giving up.
    startup_timeout_s: float = 60.0


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP side (metrics, probes, queries, status page): off unless a port is given."""

    port: int = 0  # 0: no HTTP server
    host: str = "127.0.0.1"  # 0.0.0.0 to be reached from outside (a pod's probes, Prometheus)
    # /healthz fails when the poll loop has not turned for this long (a flush may wait up to
    # output.delivery_timeout_s for deliveries without turning it).
    liveness_timeout_s: float = 60.0


@dataclass(frozen=True)
class SyncConfig:
    """Item state shared by the members of a consumer group (stream/group_sync.py)."""

    # "auto": on when the sync topic exists (`recstream topics --group-id` creates it), and users
    # go with their partition when the user-state topic exists; "on": both topics must exist;
    # "off": this member keeps its items and users to itself.
    mode: str = "auto"
    topic: str = ""  # empty: "<topics.group_id>.item-deltas"
    interval_s: float = 5.0  # how often this member sends what it changed
    # This member's name in the group; empty: one made on first start and kept in the state dir.
    member: str = ""
    # At start, how long to wait for the deltas already on the topic before consuming input.
    catch_up_timeout_s: float = 120.0
    # Send this member's session clicks with its deltas and learn the other members' into the
    # session signals (rules, co-occurrence, session-kNN learn from the whole group); false: each
    # member learns them from its own users, at a fraction of the CPU in a big group.
    sessions: bool = True
    # ... and the clicks go out this often on their own (20 bytes each): the session signals are
    # most of what a click is ranked by, and their freshness costs more than the items'.
    clicks_interval_s: float = 0.1
    # How often the member holding input partition 0 writes the group's items, as absolute values,
    # to <group_id>.item-snapshot (when it exists) for members that start late (0: never).
    snapshot_interval_s: float = 300.0


@dataclass(frozen=True)
class ServiceConfig:
    kafka: dict[str, str] = field(default_factory=dict)  # librdkafka settings for consumer and producer
    kafka_consumer: dict[str, str] = field(default_factory=dict)
    kafka_producer: dict[str, str] = field(default_factory=dict)
    topics: TopicsConfig = TopicsConfig()
    model: MFConfig = MFConfig()
    events: EventsConfig = EventsConfig()
    index: IndexConfig = IndexConfig()
    output: OutputConfig = OutputConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    monitor: MonitorConfig = MonitorConfig()
    content: ContentConfig = ContentConfig()
    loop: LoopConfig = LoopConfig()
    http: HttpConfig = HttpConfig()
    sync: SyncConfig = SyncConfig()
    state_dir: str = ""

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka.get("bootstrap.servers", "")

    @property
    def sync_topic(self) -> str:
        return self.sync.topic or sync_topic_for(self.topics.group_id)

    @property
    def user_state_topic(self) -> str:
        return user_state_topic_for(self.topics.group_id)

    @property
    def item_snapshot_topic(self) -> str:
        return item_snapshot_topic_for(self.topics.group_id)


def sync_topic_for(group_id: str) -> str:
    """The item-sync topic a group uses unless ``sync.topic`` names another."""
    return f"{group_id}.item-deltas"


def user_state_topic_for(group_id: str) -> str:
    """The topic through which a group's partitions take their users along (stream/handover.py)."""
    return f"{group_id}.user-state"


def item_snapshot_topic_for(group_id: str) -> str:
    """The compacted topic of a group's items for members that start late (stream/item_snapshot.py)."""
    return f"{group_id}.item-snapshot"


_SECTIONS = {
    "topics": TopicsConfig,
    "model": MFConfig,
    "events": EventsConfig,
    "index": IndexConfig,
    "output": OutputConfig,
    "checkpoint": CheckpointConfig,
    "monitor": MonitorConfig,
    "content": ContentConfig,
    "loop": LoopConfig,
    "http": HttpConfig,
    "sync": SyncConfig,
}

# field -> (predicate, what it must be)
_RULES: dict[str, tuple[Any, str]] = {
    "topics.input": (bool, "a non-empty topic name"),
    "topics.output": (bool, "a non-empty topic name"),
    "topics.group_id": (bool, "a non-empty group id"),
    "topics.start_from": (lambda v: v in ("committed", "earliest", "latest") or v.isdigit(),
                          "committed, earliest, latest or an epoch time in milliseconds"),
    "checkpoint.interval_s": (lambda v: v > 0, "a positive number of seconds"),
    "checkpoint.events": (lambda v: v >= 1, "a positive integer"),
    "checkpoint.keep": (lambda v: v >= 2, "an integer >= 2 (the previous checkpoint is the fallback)"),
    "model.dim": (lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    "model.learning_rate": (lambda v: 0 < v < 10, "a number in (0, 10)"),
    "model.new_item_learning_rate": (lambda v: 0 < v < 10, "a number in (0, 10)"),
    "model.new_item_events": (lambda v: v > 0, "a positive number"),
    "model.transition_learning_rate": (lambda v: 0 <= v < 10, "a number in [0, 10)"),
    "model.popularity_weight": (lambda v: v >= 0, "a number >= 0"),
    "model.bias_learning_rate": (lambda v: 0 < v < 10, "a number in (0, 10)"),
    "model.bias_prior_events": (lambda v: v > 0, "a positive number"),
    "model.rating_scale_learning_rate": (lambda v: 0 <= v < 10, "a number in [0, 10)"),
    "model.rating_scale_regularization": (lambda v: v >= 0, "a number >= 0"),
    "model.popularity_taste_learning_rate": (lambda v: 0 <= v < 10, "a number in [0, 10)"),
    "model.popularity_taste_regularization": (lambda v: v >= 0, "a number >= 0"),
    "model.regularization": (lambda v: 0 <= v < 10, "a number in [0, 10)"),
    "model.n_negatives": (lambda v: 0 <= v <= 1000, "an integer from 0 to 1000"),
    "model.init_std": (lambda v: 0 <= v < 10, "a number in [0, 10)"),
    "model.user_init_std": (lambda v: 0 <= v < 10, "a number in [0, 10)"),
    "model.seed": (lambda v: 0 <= v < 2**63, "a non-negative integer"),
    "model.negative_pool": (lambda v: 1 <= v <= 100_000_000, "an integer from 1 to 100000000"),
    "model.short_term_weight": (lambda v: v >= 0, "a number >= 0"),
    "model.short_term_half_life_s": (lambda v: v >= 0, "a number of seconds >= 0 (0: never fades)"),
    "model.short_term_keep": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    **{f"model.session_{k}": (lambda v: v >= 1, "a positive integer") for k in
       ("length", "rules_window", "query_window", "neighbours", "ring", "per_item", "knn_sample", "knn_k")},
    **{f"model.session_{k}": (lambda v: v >= 0, "a number >= 0") for k in
       ("gap_s", "half_life_s", "rules_weight", "cooc_weight", "knn_weight", "repeat_weight", "mf_weight")},
    "model.max_users": (lambda v: 0 <= v <= 2**40, "an integer >= 0 (0: no cap)"),
    "model.user_ttl_s": (lambda v: v == 0 or 1 <= v <= 100 * 365 * 86400, "0 (never) or seconds from 1 to 100 years"),
    "model.max_items": (lambda v: 0 <= v <= 2**40, "an integer >= 0 (0: no cap)"),
    "model.item_ttl_s": (lambda v: v == 0 or 1 <= v <= 100 * 365 * 86400, "0 (never) or seconds from 1 to 100 years"),
    "model.rating_replay_steps": (lambda v: 0 <= v <= 1000, "an integer from 0 to 1000"),
    "model.rating_replay_pool": (lambda v: 1 <= v <= 100_000_000, "an integer from 1 to 100000000"),
    "model.rating_replay_learning_rate": (lambda v: 0 <= v < 10, "a number in [0, 10)"),
    "model.rating_replay_regularization": (lambda v: v >= 0, "a number >= 0"),
    "events.weights": (lambda v: bool(v) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                 and math.isfinite(w) and w > 0 for w in v.values()),
                       "a non-empty table of event type = positive number"),
    "events.max_message_bytes": (lambda v: v >= 64, "an integer >= 64"),
    "events.max_id_length": (lambda v: v >= 1, "a positive integer"),
    "events.clock_tolerance_s": (lambda v: 0 <= v <= 365 * 86400, "a number of seconds from 0 to 31536000"),
    "events.rating_min": (lambda v: abs(v) <= 1e9, "a number from -1e9 to 1e9"),
    "events.rating_max": (lambda v: abs(v) <= 1e9, "a number from -1e9 to 1e9"),
    "model.rating_unit": (lambda v: 0 < v <= 1e9, "a positive number (rating points per learning unit)"),
    "index.n_trees": (lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
    "index.search_k": (lambda v: v == -1 or v >= 1, "-1 (annoy's default) or a positive integer"),
    "index.rebuild_interval_s": (lambda v: v > 0, "a positive number of seconds"),
    "index.rebuild_changed_fraction": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "index.min_rebuild_interval_s": (lambda v: v >= 0, "a non-negative number of seconds"),
    "index.max_build_share": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "index.min_items": (lambda v: v >= 1, "a positive integer"),
    "index.build_timeout_s": (lambda v: v > 0, "a positive number of seconds"),
    "index.exact_items": (lambda v: v >= 1, "a positive integer"),
    "index.max_lookups": (lambda v: v >= 0, "a non-negative integer"),
    "index.min_item_events": (lambda v: v >= 1, "a positive integer (1: every item)"),
    "output.top_k": (lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
    "output.history_per_user": (lambda v: v >= 0, "a non-negative integer"),
    "output.flush_interval_s": (lambda v: v > 0, "a positive number of seconds"),
    "output.max_pending_users": (lambda v: v >= 1, "a positive integer"),
    "output.max_publish_share": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "output.delivery_timeout_s": (lambda v: v > 0, "a positive number of seconds"),
    "content.refresh_interval_s": (lambda v: v > 0, "a positive number of seconds"),
    "content.cold_count": (lambda v: v >= 1, "a positive integer"),
    "content.text_encoder": (lambda v: v in TEXT_ENCODERS, " or ".join(TEXT_ENCODERS)),
    "monitor.adwin_delta": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "monitor.item_drift_threshold": (lambda v: 0 < v <= 2, "a cosine distance in (0, 2]"),
    "loop.batch_size": (lambda v: 1 <= v <= 1_000_000, "an integer from 1 to 1000000"),
    "loop.poll_timeout_s": (lambda v: v > 0, "a positive number of seconds"),
    "loop.status_interval_s": (lambda v: v > 0, "a positive number of seconds"),
    "loop.startup_timeout_s": (lambda v: v > 0, "a positive number of seconds"),
    "http.port": (lambda v: 0 <= v <= 65535, "a TCP port from 0 (off) to 65535"),
    "http.host": (bool, "a host name or address to listen on"),
    "http.liveness_timeout_s": (lambda v: v > 0, "a positive number of seconds"),
    "sync.mode": (lambda v: v in ("auto", "on", "off"), "auto, on or off"),
    "sync.interval_s": (lambda v: 0 < v <= 86400, "a number of seconds in (0, 86400]"),
    "sync.clicks_interval_s": (lambda v: 0 < v <= 86400, "a number of seconds in (0, 86400]"),
    "sync.snapshot_interval_s": (lambda v: v >= 0, "a non-negative number of seconds (0: never)"),
    "sync.catch_up_timeout_s": (lambda v: v > 0, "a positive number of seconds"),
}


def _typed(name: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default``, or a ConfigError naming ``name``."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
                if math.isfinite(number):
                    return number
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")


def _section(name: str, cls: type, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a table, got {values!r}")
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})")
    typed = {}
    for key, value in values.items():
        full = f"{name}.{key}"
        typed[key] = _typed(full, value, getattr(defaults, key))
    section = dataclasses.replace(defaults, **typed)
    for key in known:
        rule = _RULES.get(f"{name}.{key}")
        value = getattr(section, key)
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{name}.{key}: must be {rule[1]}, got {value!r}")
    return section


def _librdkafka(name: str, values: Any) -> dict[str, str]:
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a table of librdkafka settings, got {values!r}")
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            raise ConfigError(f"{name}.{key}: expected a value, got a table")
        out[key] = _reference(f"{name}.{key}", str(value).lower() if isinstance(value, bool) else str(value))
    return out


_REFERENCE = re.compile(r"\$\{(env|file):([^}]+)\}")


def _reference(name: str, value: str) -> str:
    """A librdkafka value with ``${env:NAME}`` and ``${file:PATH}`` replaced by what they name.

    Secrets (``sasl.password``, ``ssl.key.password``) can then come from the
    environment or a mounted file instead of the command line, where any user
    of the machine can read them. A file's trailing newline is dropped.

    >>> import os; os.environ["RS_DOCTEST_PASSWORD"] = "s3cret"
    >>> _reference("kafka.sasl.password", "${env:RS_DOCTEST_PASSWORD}")
    's3cret'
    """
    def resolve(match: re.Match) -> str:
        kind, what = match.groups()
        if kind == "env":
            if what not in os.environ:
                raise ConfigError(f"{name}: environment variable {what} is not set")
            return os.environ[what]
        try:
            return Path(what).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {what}: {exc.strerror}") from None

    return _REFERENCE.sub(resolve, value)


def build_config(data: dict[str, Any]) -> ServiceConfig:
    """A checked :class:`ServiceConfig` from a parsed TOML document (or an equivalent dict)."""
    data = dict(data)
    kafka = dict(data.pop("kafka", {}) or {})
    if not isinstance(kafka, dict):
        raise ConfigError(f"kafka: expected a table of librdkafka settings, got {kafka!r}")
    consumer = _librdkafka("kafka.consumer", kafka.pop("consumer", {}))
    producer = _librdkafka("kafka.producer", kafka.pop("producer", {}))
    sections = {name: _section(name, cls, data.pop(name, {})) for name, cls in _SECTIONS.items()}
    state_dir = _typed("state_dir", data.pop("state_dir", ""), "")
    if data:
        raise ConfigError(f"{sorted(data)[0]}: unknown setting (known: kafka, state_dir, {', '.join(_SECTIONS)})")
    if sections["content"].text_encoder == "minilm":
        try:
            MiniLMText.check_installed()  # fail at start-up, not at the first metadata message
        except ImportError as exc:
            raise ConfigError(f"content.text_encoder: {exc}") from exc
    if not sections["events"].rating_min < sections["events"].rating_max:
        raise ConfigError(f"events.rating_max: must be above events.rating_min ({sections['events'].rating_min!r}), "
                          f"got {sections['events'].rating_max!r}")
    for event_type in [sections["events"].default_event_type]:
        if event_type not in sections["events"].weights:
            raise ConfigError(f"events.default_event_type: {event_type!r} has no weight in events.weights")
    return ServiceConfig(
        kafka=_librdkafka("kafka", kafka), kafka_consumer=consumer, kafka_producer=producer,
        state_dir=state_dir, **sections,
    )


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ServiceConfig:
    """Read ``path`` (TOML), apply ``overrides`` (dotted keys, e.g. ``"model.dim"``), check everything.

    >>> load_config(overrides={"model.dim": "16"}).model.dim
    16
    >>> try:
    ...     load_config(overrides={"model.dim": 0})
    ... except ConfigError as exc:
    ...     print(exc)
    model.dim: must be an integer from 1 to 4096, got 0
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        if dotted.startswith("kafka."):
            # librdkafka keys contain dots themselves: "kafka.session.timeout.ms",
            # "kafka.producer.message.timeout.ms".
            key = dotted[len("kafka."):]
            for client in ("consumer", "producer"):
                if key.startswith(client + "."):
                    data.setdefault("kafka", {}).setdefault(client, {})[key[len(client) + 1:]] = value
                    break
            else:
                data.setdefault("kafka", {})[key] = value
            continue
        head, _, key = dotted.partition(".")
        if key:
            data.setdefault(head, {})[key] = value
        else:
            data[head] = value
    return build_config(data)
