"""Settings: built once from the environment (and a `.env` file; the environment wins), validated, frozen."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import attrs

from .consumers import default_consumer_name
from .errors import ConfigError
from .keys import ShardKeys, shard_keys
from .redact import mask_url

T = TypeVar("T")

MODEL_TYPES = ("embedded", "transformers", "llm", "noop")
# Names the original service's documentation used: its `.env` must keep working unchanged.
MODEL_TYPE_ALIASES = {"local": "embedded"}
LLM_PROVIDERS = ("", "groq", "openai", "anthropic")
LOG_FORMATS = ("text", "json")
REDIS_CLUSTER_MODES = ("auto", "yes", "no")


def _env(name: str, default: object) -> Any:
    """A setting read from the environment variable `name` (see `Settings.to_env`)."""
    return attrs.field(default=default, metadata={"env": name})


@attrs.frozen(repr=False)
class Settings:
    database_url: str = _env("DATABASE_URL", "postgresql://localhost/sentiment")
    redis_url: str = _env("REDIS_URL", "redis://localhost:6379/0")
    stream: str = _env("REDIS_STREAM_NAME", "social_posts")
    group: str = _env("REDIS_CONSUMER_GROUP", "sentiment_workers")
    # Default: <hostname>-<pid>-<6 random hex digits>, unique per process (see consumers.py).
    consumer: str = attrs.field(factory=default_consumer_name, metadata={"env": "CONSUMER_NAME"})
    # auto: ask the server (INFO cluster); yes/no: skip the question.
    redis_cluster: str = _env("REDIS_CLUSTER", "auto")
    stream_shards: int = _env("REDIS_STREAM_SHARDS", 1)  # the stream as N keys, each in its own slot
    # A consumer of the group with nothing pending and idle this long is removed (0: never).
    consumer_remove_idle_ms: int = _env("CONSUMER_REMOVE_IDLE_MS", 3_600_000)
    # 256, not 64: each batch costs a fixed round of Redis, PostgreSQL and thread hand-offs, which at 64
    # took a fifth of the time on the default model's cores (docs/benchmarks.md, "Design measurements").
    # A quiet stream's batches stay small: the reader takes what is there.
    batch_size: int = _env("BATCH_SIZE", 256)
    block_ms: int = _env("BLOCK_MS", 2000)
    claim_min_idle_ms: int = _env("CLAIM_MIN_IDLE_MS", 60_000)
    reclaim_interval_ms: int = _env("RECLAIM_INTERVAL_MS", 30_000)
    max_deliveries: int = _env("MAX_DELIVERIES", 5)
    dead_letter_stream: str = _env("DEAD_LETTER_STREAM", "")
    shutdown_grace_s: float = _env("SHUTDOWN_GRACE_S", 10.0)
    stuck_batch_s: float = _env(
        "STUCK_BATCH_S", 300.0
    )  # a batch whose write and ack take longer releases its leases
    max_content_bytes: int = _env("MAX_CONTENT_BYTES", 100_000)
    # Bounds on the raw entry, checked before anything is decoded or parsed.
    max_entry_bytes: int = _env("MAX_ENTRY_BYTES", 1_000_000)
    max_entry_fields: int = _env("MAX_ENTRY_FIELDS", 64)
    max_field_name_bytes: int = _env("MAX_FIELD_NAME_BYTES", 256)
    dead_letter_max_bytes: int = _env(
        "DEAD_LETTER_MAX_BYTES", 65_536
    )  # a dead-letter copy of a larger entry is truncated to this
    model_type: str = _env("MODEL_TYPE", "embedded")
    quantize: bool = _env("MODEL_QUANTIZE", True)
    inference_threads: int = _env(
        "INFERENCE_THREADS", 0
    )  # embedded model: single-core inference threads (0: one per usable core)
    sentiment_model: str = _env("SENTIMENT_MODEL", "cardiffnlp/twitter-roberta-base-sentiment-latest")
    emotion_model: str = _env("EMOTION_MODEL", "j-hartmann/emotion-english-distilroberta-base")
    emotion_label_map: str = _env(
        "EMOTION_LABEL_MAP", ""
    )  # "label=emotion,label=emotion" overrides for MODEL_TYPE=transformers
    llm_provider: str = _env("LLM_PROVIDER", "")
    llm_api_key: str = _env("LLM_API_KEY", "")
    llm_model: str = _env("LLM_MODEL", "")
    llm_base_url: str = _env("LLM_BASE_URL", "")
    metrics_port: int = _env("METRICS_PORT", 9100)
    log_level: str = _env("LOG_LEVEL", "INFO")
    log_format: str = _env("LOG_FORMAT", "text")
    # Results of repeated texts, per worker (0 entries: no cache).
    cache_entries: int = _env("CACHE_ENTRIES", 4096)
    cache_max_bytes: int = _env("CACHE_MAX_BYTES", 8_000_000)
    stream_retention_s: int = _env(
        "STREAM_RETENTION", 0
    )  # 0: off; else trim acked entries older than this (never pending ones)

    @property
    def dead_letter(self) -> str:
        return self.dead_letter_stream or f"{self.stream}:dead"

    @property
    def attempts_key(self) -> str:
        """The hash of per-entry attempt counts (see RedisStream.count_failures)."""
        return f"{self.stream}:attempts:{self.group}"

    def keys(self, *, cluster: bool) -> tuple[ShardKeys, ...]:
        """Each shard's stream, dead-letter and attempts keys (see keys.py), on a cluster or not."""
        return shard_keys(
            stream=self.stream,
            group=self.group,
            dead_letter=self.dead_letter,
            shards=self.stream_shards,
            cluster=cluster,
        )

    def __repr__(self) -> str:
        # Never print secrets, whatever logs or tracebacks do with this object.
        return (
            f"Settings(database_url={mask_url(self.database_url)!r}, redis_url={mask_url(self.redis_url)!r}, "
            f"stream={self.stream!r}, group={self.group!r}, consumer={self.consumer!r}, "
            f"model_type={self.model_type!r}, llm_api_key={'***' if self.llm_api_key else ''!r})"
        )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")
    ) -> Settings:
        """Read the settings; a bad value raises ConfigError naming the variable."""
        env: dict[str, str] = {}
        if dotenv is not None and dotenv.is_file():
            from dotenv import dotenv_values

            env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        env.update(os.environ if environ is None else environ)
        return cls._from_reader(_Reader(env))

    def to_env(self) -> dict[str, str]:
        """The environment that `from_env` reads back as these settings (for worker subprocesses)."""
        env = {}
        for field in attrs.fields(Settings):
            value = getattr(self, field.name)
            env[field.metadata["env"]] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """Every variable the settings read (for .env.example, compose and their tests)."""
        reader = _Reader({})
        cls._from_reader(reader)
        return frozenset(reader.seen)

    @classmethod
    def _from_reader(cls, r: _Reader) -> Settings:
        d = cls()  # the defaults (class attributes of a slotted attrs class are descriptors, not values)
        stream = r.text("stream", d.stream)
        settings = cls(
            database_url=r.url("database_url", d.database_url, ("postgresql", "postgres")),
            redis_url=_redis_url(r),
            stream=stream,
            group=r.text("group", d.group),
            consumer=r.text("consumer", default_consumer_name()),
            redis_cluster=r.choice("redis_cluster", d.redis_cluster, REDIS_CLUSTER_MODES),
            stream_shards=r.integer("stream_shards", d.stream_shards, 1, 1024),
            consumer_remove_idle_ms=r.integer(
                "consumer_remove_idle_ms", d.consumer_remove_idle_ms, 0, 10 * 86_400_000
            ),
            batch_size=r.integer("batch_size", d.batch_size, 1, 10_000),
            block_ms=r.integer("block_ms", d.block_ms, 1, 600_000),
            claim_min_idle_ms=r.integer("claim_min_idle_ms", d.claim_min_idle_ms, 1, 86_400_000),
            reclaim_interval_ms=r.integer("reclaim_interval_ms", d.reclaim_interval_ms, 1, 86_400_000),
            max_deliveries=r.integer("max_deliveries", d.max_deliveries, 1, 1000),
            dead_letter_stream=r.text("dead_letter_stream", f"{stream}:dead"),
            shutdown_grace_s=r.number("shutdown_grace_s", d.shutdown_grace_s, 0.0, 3600.0),
            stuck_batch_s=r.number("stuck_batch_s", d.stuck_batch_s, 0.1, 86400.0),
            max_content_bytes=r.integer("max_content_bytes", d.max_content_bytes, 1, 100_000_000),
            max_entry_bytes=r.integer("max_entry_bytes", d.max_entry_bytes, 1024, 512_000_000),
            max_entry_fields=r.integer("max_entry_fields", d.max_entry_fields, 1, 100_000),
            max_field_name_bytes=r.integer("max_field_name_bytes", d.max_field_name_bytes, 8, 65_536),
            dead_letter_max_bytes=r.integer(
                "dead_letter_max_bytes", d.dead_letter_max_bytes, 1024, 512_000_000
            ),
            model_type=r.choice("model_type", d.model_type, MODEL_TYPES, MODEL_TYPE_ALIASES),
            quantize=r.flag("quantize", d.quantize),
            inference_threads=r.integer("inference_threads", d.inference_threads, 0, 256),
            sentiment_model=r.text("sentiment_model", d.sentiment_model),
            emotion_model=r.text("emotion_model", d.emotion_model),
            emotion_label_map=r.text("emotion_label_map", "", required=False),
            llm_provider=r.choice("llm_provider", d.llm_provider, LLM_PROVIDERS),
            llm_api_key=r.text("llm_api_key", "", required=False),
            llm_model=r.text("llm_model", "", required=False),
            llm_base_url=r.text("llm_base_url", "", required=False),
            metrics_port=r.integer("metrics_port", d.metrics_port, 0, 65535),
            log_level=r.choice("log_level", d.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
            log_format=r.choice("log_format", d.log_format, LOG_FORMATS),
            cache_entries=r.integer("cache_entries", d.cache_entries, 0, 10_000_000),
            cache_max_bytes=r.integer("cache_max_bytes", d.cache_max_bytes, 0, 64_000_000_000),
            stream_retention_s=r.integer("stream_retention_s", d.stream_retention_s, 0, 10**9),
        )
        if settings.dead_letter in (settings.stream, settings.attempts_key):
            raise ConfigError(
                f"DEAD_LETTER_STREAM must differ from REDIS_STREAM_NAME ({stream}) and from the attempts "
                f"key ({settings.attempts_key})"
            )
        if 0 < settings.consumer_remove_idle_ms <= 2 * settings.block_ms:
            # A live worker's idle time reaches BLOCK_MS between reads: it must never look dead.
            raise ConfigError(
                f"CONSUMER_REMOVE_IDLE_MS ({settings.consumer_remove_idle_ms}) must be 0 or more than twice "
                f"BLOCK_MS ({settings.block_ms})"
            )
        # Names that cannot carry a shard's hash tag fail here, where they can: on a cluster found by
        # REDIS_CLUSTER=auto, when the worker connects.
        settings.keys(cluster=settings.redis_cluster == "yes")
        return settings


@functools.cache
def _env_names() -> dict[str, str]:
    return {f.name: f.metadata["env"] for f in attrs.fields(Settings)}


@attrs.define
class _Reader:
    env: Mapping[str, str]
    seen: set[str] = attrs.Factory(set)

    def _get(self, key: str) -> tuple[str, str | None]:
        """The variable a field reads (`key`: the field's name, or a variable's, such as REDIS_HOST) and
        its value, None when unset or blank."""
        name = _env_names().get(key, key)
        self.seen.add(name)
        value = self.env.get(name)
        return name, None if value is None or value.strip() == "" else value.strip()

    def text(self, key: str, default: str, *, required: bool = True) -> str:
        name, value = self._get(key)
        if value is None:
            return default
        if required and any(c.isspace() for c in value):
            raise ConfigError(f"{name} must not contain spaces, got {value!r}")
        return value

    def _parsed(self, key: str, default: T, parse: Callable[[str], T], what: str) -> tuple[str, T]:
        name, value = self._get(key)
        if value is None:
            return name, default
        try:
            return name, parse(value)
        except ValueError:
            raise ConfigError(f"{name} must be {what}, got {value!r}") from None

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        what = f"an integer from {low} to {high}"
        name, value = self._parsed(key, default, int, what)
        if not low <= value <= high:
            raise ConfigError(f"{name} must be {what}, got {value}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        what = f"a number from {low:g} to {high:g}"
        name, value = self._parsed(key, default, float, what)
        if not low <= value <= high:
            raise ConfigError(f"{name} must be {what}, got {value:g}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        words = {
            "1": True,
            "true": True,
            "yes": True,
            "on": True,
            "0": False,
            "false": False,
            "no": False,
            "off": False,
        }

        def parse(v: str) -> bool:
            if v.lower() not in words:
                raise ValueError(v)
            return words[v.lower()]

        return self._parsed(key, default, parse, "one of 1/0, true/false, yes/no, on/off")[1]

    def choice(
        self,
        key: str,
        default: str,
        allowed: tuple[str, ...],
        aliases: Mapping[str, str] | None = None,
        *,
        upper: bool = False,
    ) -> str:
        name, value = self._get(key)
        if value is None:
            return default
        value = value.upper() if upper else value.lower()
        value = (aliases or {}).get(value, value)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(a for a in allowed if a)}, got {value!r}")
        return value

    def url(self, key: str, default: str, schemes: tuple[str, ...]) -> str:
        name, found = self._get(key)
        value = found or default
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ConfigError(f"{name} is not a valid URL: {mask_url(value)!r}") from None
        if parts.scheme not in schemes:
            raise ConfigError(
                f"{name} must start with {' or '.join(s + '://' for s in schemes)}, got {mask_url(value)!r}"
            )
        return value


def _redis_url(r: _Reader) -> str:
    url = r.url("redis_url", "redis://localhost:6379/0", ("redis", "rediss", "unix"))
    host = r.text("REDIS_HOST", "localhost")
    port = r.integer("REDIS_PORT", 6379, 1, 65535)
    password = r.text("REDIS_PASSWORD", "", required=False)
    if r.env.get("REDIS_URL", "").strip():
        return url
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/0"
