"""Settings: built once from the environment (and a `.env` file; the environment wins), validated, frozen."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import attrs

from .errors import ConfigError

T = TypeVar("T")

MODEL_TYPES = ("embedded", "transformers", "llm", "noop")
# Names the original service's documentation used: its `.env` must keep working unchanged.
MODEL_TYPE_ALIASES = {"local": "embedded"}
LLM_PROVIDERS = ("", "groq", "openai", "anthropic")
LOG_FORMATS = ("text", "json")


# Query parameters that carry a secret (libpq's `password`, `sslpassword`; redis-py's `password`).
_SECRET_PARAMS = frozenset({"password", "sslpassword", "pass", "pwd"})


def one_line(text: str) -> str:
    """A message as one line: driver messages carry DETAIL/CONTEXT lines, field names may hold newlines."""
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def _is_secret_param(part: str) -> bool:
    """Whether one `key=value` of a query string carries a secret."""
    return unquote(part.partition("=")[0]).lower() in _SECRET_PARAMS


def _secrets(url: str) -> list[str]:
    """The password in a URL, as written (a driver may echo a token it could not decode) and decoded."""
    rest = url.partition("://")[2]
    authority, _, query = rest.partition("?")
    userinfo = authority.partition("/")[0].rpartition("@")[0]
    found = [userinfo.partition(":")[2]] if ":" in userinfo else []
    found.extend(part.partition("=")[2] for part in query.split("&") if _is_secret_param(part))
    return [s for raw in found for s in {raw, unquote(raw)} if len(s) >= 3]


def driver_text(exc: BaseException, *urls: str) -> str:
    """A driver's error message as one line, without any password of `urls` in it."""
    text = one_line(str(exc))
    for secret in sorted((s for url in urls for s in _secrets(url)), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def mask_url(url: str) -> str:
    """The URL with its password replaced by `***` (in the user-info part and in query parameters), for
    logs, error messages and `stats`."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "<unparseable URL>"
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        query = "&".join(
            f"{p.partition('=')[0]}=***" if _is_secret_param(p) else p for p in parts.query.split("&")
        )
        parts = parts._replace(query=query)
    return urlunsplit(parts)


@attrs.frozen(repr=False)
class Settings:
    database_url: str = "postgresql://localhost/sentiment"
    redis_url: str = "redis://localhost:6379/0"
    stream: str = "social_posts"
    group: str = "sentiment_workers"
    consumer: str = attrs.field(factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    batch_size: int = 64
    block_ms: int = 2000
    claim_min_idle_ms: int = 60_000
    reclaim_interval_ms: int = 30_000
    max_deliveries: int = 5
    dead_letter_stream: str = ""
    shutdown_grace_s: float = 10.0
    stuck_batch_s: float = 300.0  # a batch whose write and ack take longer releases its leases
    max_content_bytes: int = 100_000
    # Bounds on the raw entry, checked before anything is decoded or parsed.
    max_entry_bytes: int = 1_000_000
    max_entry_fields: int = 64
    max_field_name_bytes: int = 256
    dead_letter_max_bytes: int = 65_536  # a dead-letter copy of a larger entry is truncated to this
    model_type: str = "embedded"
    quantize: bool = True
    inference_threads: int = 0  # embedded model: single-core inference threads (0: one per usable core)
    sentiment_model: str = "cardiffnlp/twitter-roberta-base-sentiment-latest"
    emotion_model: str = "j-hartmann/emotion-english-distilroberta-base"
    emotion_label_map: str = ""  # "label=emotion,label=emotion" overrides for MODEL_TYPE=transformers
    llm_provider: str = ""
    llm_api_key: str = ""
    llm_model: str = ""
    llm_base_url: str = ""
    metrics_port: int = 9100
    log_level: str = "INFO"
    log_format: str = "text"
    stream_retention_s: int = 0  # 0: off; else trim acked entries older than this (never pending ones)

    @property
    def dead_letter(self) -> str:
        return self.dead_letter_stream or f"{self.stream}:dead"

    @property
    def attempts_key(self) -> str:
        """The hash of per-entry attempt counts (see RedisStream.count_failures)."""
        return f"{self.stream}:attempts:{self.group}"

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

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """Every variable the settings read (for .env.example, compose and their tests)."""
        reader = _Reader({})
        cls._from_reader(reader)
        return frozenset(reader.seen)

    @classmethod
    def _from_reader(cls, r: _Reader) -> Settings:
        d = cls()  # the defaults (class attributes of a slotted attrs class are descriptors, not values)
        stream = r.text("REDIS_STREAM_NAME", d.stream)
        settings = cls(
            database_url=r.url("DATABASE_URL", d.database_url, ("postgresql", "postgres")),
            redis_url=_redis_url(r),
            stream=stream,
            group=r.text("REDIS_CONSUMER_GROUP", d.group),
            consumer=r.text("CONSUMER_NAME", f"{socket.gethostname()}-{os.getpid()}"),
            batch_size=r.integer("BATCH_SIZE", d.batch_size, 1, 10_000),
            block_ms=r.integer("BLOCK_MS", d.block_ms, 1, 600_000),
            claim_min_idle_ms=r.integer("CLAIM_MIN_IDLE_MS", d.claim_min_idle_ms, 1, 86_400_000),
            reclaim_interval_ms=r.integer("RECLAIM_INTERVAL_MS", d.reclaim_interval_ms, 1, 86_400_000),
            max_deliveries=r.integer("MAX_DELIVERIES", d.max_deliveries, 1, 1000),
            dead_letter_stream=r.text("DEAD_LETTER_STREAM", f"{stream}:dead"),
            shutdown_grace_s=r.number("SHUTDOWN_GRACE_S", d.shutdown_grace_s, 0.0, 3600.0),
            stuck_batch_s=r.number("STUCK_BATCH_S", d.stuck_batch_s, 0.1, 86400.0),
            max_content_bytes=r.integer("MAX_CONTENT_BYTES", d.max_content_bytes, 1, 100_000_000),
            max_entry_bytes=r.integer("MAX_ENTRY_BYTES", d.max_entry_bytes, 1024, 512_000_000),
            max_entry_fields=r.integer("MAX_ENTRY_FIELDS", d.max_entry_fields, 1, 100_000),
            max_field_name_bytes=r.integer("MAX_FIELD_NAME_BYTES", d.max_field_name_bytes, 8, 65_536),
            dead_letter_max_bytes=r.integer(
                "DEAD_LETTER_MAX_BYTES", d.dead_letter_max_bytes, 1024, 512_000_000
            ),
            model_type=r.choice("MODEL_TYPE", d.model_type, MODEL_TYPES, MODEL_TYPE_ALIASES),
            quantize=r.flag("MODEL_QUANTIZE", d.quantize),
            inference_threads=r.integer("INFERENCE_THREADS", d.inference_threads, 0, 256),
            sentiment_model=r.text("SENTIMENT_MODEL", d.sentiment_model),
            emotion_model=r.text("EMOTION_MODEL", d.emotion_model),
            emotion_label_map=r.text("EMOTION_LABEL_MAP", "", required=False),
            llm_provider=r.choice("LLM_PROVIDER", d.llm_provider, LLM_PROVIDERS),
            llm_api_key=r.text("LLM_API_KEY", "", required=False),
            llm_model=r.text("LLM_MODEL", "", required=False),
            llm_base_url=r.text("LLM_BASE_URL", "", required=False),
            metrics_port=r.integer("METRICS_PORT", d.metrics_port, 0, 65535),
            log_level=r.choice("LOG_LEVEL", d.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
            log_format=r.choice("LOG_FORMAT", d.log_format, LOG_FORMATS),
            stream_retention_s=r.integer("STREAM_RETENTION", d.stream_retention_s, 0, 10**9),
        )
        if settings.dead_letter in (settings.stream, settings.attempts_key):
            raise ConfigError(
                f"DEAD_LETTER_STREAM must differ from REDIS_STREAM_NAME ({stream}) and from the attempts "
                f"key ({settings.attempts_key})"
            )
        return settings


@attrs.define
class _Reader:
    env: Mapping[str, str]
    seen: set[str] = attrs.Factory(set)

    def _get(self, name: str) -> str | None:
        self.seen.add(name)
        value = self.env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def text(self, name: str, default: str, *, required: bool = True) -> str:
        value = self._get(name)
        if value is None:
            return default
        if required and any(c.isspace() for c in value):
            raise ConfigError(f"{name} must not contain spaces, got {value!r}")
        return value

    def _parsed(self, name: str, default: T, parse: Callable[[str], T], what: str) -> T:
        value = self._get(name)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError:
            raise ConfigError(f"{name} must be {what}, got {value!r}") from None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        what = f"an integer from {low} to {high}"
        value = self._parsed(name, default, int, what)
        if not low <= value <= high:
            raise ConfigError(f"{name} must be {what}, got {value}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        what = f"a number from {low:g} to {high:g}"
        value = self._parsed(name, default, float, what)
        if not low <= value <= high:
            raise ConfigError(f"{name} must be {what}, got {value:g}")
        return value

    def flag(self, name: str, default: bool) -> bool:
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

        return self._parsed(name, default, parse, "one of 1/0, true/false, yes/no, on/off")

    def choice(
        self,
        name: str,
        default: str,
        allowed: tuple[str, ...],
        aliases: Mapping[str, str] | None = None,
        *,
        upper: bool = False,
    ) -> str:
        value = self._get(name)
        if value is None:
            return default
        value = value.upper() if upper else value.lower()
        value = (aliases or {}).get(value, value)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(a for a in allowed if a)}, got {value!r}")
        return value

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        value = self._get(name) or default
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
    url = r.url("REDIS_URL", "redis://localhost:6379/0", ("redis", "rediss", "unix"))
    host = r.text("REDIS_HOST", "localhost")
    port = r.integer("REDIS_PORT", 6379, 1, 65535)
    password = r.text("REDIS_PASSWORD", "", required=False)
    if r.env.get("REDIS_URL", "").strip():
        return url
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/0"
