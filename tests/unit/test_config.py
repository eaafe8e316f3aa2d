"""Settings: defaults, .env file, environment precedence, validation messages, secrets kept out of text."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from sentiment.config import Settings
from sentiment.errors import ConfigError
from sentiment.redact import driver_text, mask_url


def test_defaults_follow_the_seed(tmp_path: Path) -> None:
    s = Settings.from_env({}, dotenv=tmp_path / ".env")
    assert (s.database_url, s.redis_url) == ("postgresql://localhost/sentiment", "redis://localhost:6379/0")
    assert (s.stream, s.group, s.max_deliveries, s.model_type) == (
        "social_posts",
        "sentiment_workers",
        5,
        "embedded",
    )
    assert s.dead_letter == "social_posts:dead"
    assert "-" in s.consumer  # hostname-pid


def test_dotenv_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("REDIS_STREAM_NAME=from_file\nBATCH_SIZE=7\n# comment\nREDIS_HOST=cache\n")
    s = Settings.from_env({"BATCH_SIZE": "9"}, dotenv=env_file)
    assert (s.stream, s.batch_size, s.redis_url) == ("from_file", 9, "redis://cache:6379/0")
    assert s.dead_letter == "from_file:dead"


def test_redis_url_overrides_host_and_port() -> None:
    s = Settings.from_env({"REDIS_URL": "rediss://:pw@secure:6380/2", "REDIS_HOST": "ignored"}, dotenv=None)
    assert s.redis_url == "rediss://:pw@secure:6380/2"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE must be an integer from 1 to 10000, got 0"),
        ({"BLOCK_MS": "soon"}, "BLOCK_MS must be an integer"),
        ({"MODEL_TYPE": "gpt"}, "MODEL_TYPE must be one of embedded, transformers, llm, noop"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL must start with postgresql://"),
        ({"REDIS_URL": "redis://h:notaport"}, "REDIS_URL is not a valid URL"),
        ({"SHUTDOWN_GRACE_S": "-1"}, "SHUTDOWN_GRACE_S must be a number from 0 to 3600"),
        ({"MODEL_QUANTIZE": "maybe"}, "MODEL_QUANTIZE must be one of 1/0"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Settings.from_env(env, dotenv=None)


def test_secrets_never_show() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u:hunter2@db/x",
            "REDIS_URL": "redis://:r3dis@h:1/0",
            "LLM_API_KEY": "sk-abc",
        },
        dotenv=None,
    )
    text = repr(s) + str(s)
    assert "hunter2" not in text and "r3dis" not in text and "sk-abc" not in text
    assert (
        mask_url("postgresql://u:hunter2@db:5432/x?sslmode=require")
        == "postgresql://u:***@db:5432/x?sslmode=require"
    )
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DATABASE_URL": "mysql://u:hunter2@db/x"}, dotenv=None)
    assert "hunter2" not in str(err.value)


def test_the_seed_services_env_file_works_unchanged(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "DATABASE_URL=postgresql://user:pass@db:5432/sentiment\nREDIS_HOST=redis\nREDIS_PORT=6380\n"
        "MODEL_TYPE=local\n"
    )
    s = Settings.from_env({}, dotenv=env_file)
    assert s.model_type == "embedded"  # `local` meant the local Hugging Face models
    assert s.redis_url == "redis://redis:6380/0"
    assert s.database_url == "postgresql://user:pass@db:5432/sentiment"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u@h/db?password=s3cret", "postgresql://u@h/db?password=***"),
        (
            "postgresql://u@h/db?sslmode=require&sslpassword=s3cret",
            "postgresql://u@h/db?sslmode=require&sslpassword=***",
        ),
        ("redis://h:6379/0?password=s3cret", "redis://h:6379/0?password=***"),
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ],
)
def test_passwords_in_query_parameters_are_masked_too(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_a_dead_letter_key_that_is_another_of_our_keys_is_refused() -> None:
    with pytest.raises(ConfigError, match="DEAD_LETTER_STREAM must differ"):
        Settings.from_env({"DEAD_LETTER_STREAM": "social_posts:attempts:sentiment_workers"}, dotenv=None)


def test_consumers_are_removed_only_well_past_a_blocking_read() -> None:
    with pytest.raises(ConfigError, match="CONSUMER_REMOVE_IDLE_MS"):
        Settings.from_env({"CONSUMER_REMOVE_IDLE_MS": "4000", "BLOCK_MS": "2000"}, dotenv=None)
    assert Settings.from_env({"CONSUMER_REMOVE_IDLE_MS": "0"}, dotenv=None).consumer_remove_idle_ms == 0
    assert Settings.from_env({"CONSUMER_REMOVE_IDLE_MS": "4001"}, dotenv=None).consumer_remove_idle_ms == 4001


def test_libpq_keyword_strings_and_hashes_lose_their_passwords() -> None:
    assert mask_url("host=db user=app password='a b' dbname=x") == "host=db user=app password=*** dbname=x"
    assert mask_url("postgresql://app@db/x?password=ab#cd") == "postgresql://app@db/x?password=***"
    assert driver_text(ValueError("got password=s3cret"), "host=db password=s3cret") == "got password=***"


def test_driver_messages_lose_passwords_and_line_breaks() -> None:
    # libpq echoes a token it cannot decode; both spellings of the password must go.
    dsn = "postgresql://app:p%41ss-word@db/x?sslpassword=s3cret"
    message = ValueError('invalid percent-encoded token: "p%41ss-word"\n\tor "pAss-word", and s3cret')
    assert driver_text(message, dsn) == 'invalid percent-encoded token: "***" | or "***", and ***'


def test_to_env_is_read_back_as_the_same_settings() -> None:
    # Every setting away from its default, so a field that to_env forgot or misnamed shows up.
    env = {
        "DATABASE_URL": "postgresql://u:pw@db:5433/x",
        "REDIS_URL": "redis://:pw@cache:6380/2",
        "REDIS_STREAM_NAME": "s",
        "REDIS_CONSUMER_GROUP": "g",
        "CONSUMER_NAME": "c",
        "BATCH_SIZE": "7",
        "BLOCK_MS": "11",
        "CLAIM_MIN_IDLE_MS": "13",
        "RECLAIM_INTERVAL_MS": "17",
        "MAX_DELIVERIES": "3",
        "DEAD_LETTER_STREAM": "d",
        "SHUTDOWN_GRACE_S": "2.5",
        "STUCK_BATCH_S": "9.5",
        "MAX_CONTENT_BYTES": "99",
        "MAX_ENTRY_BYTES": "2048",
        "MAX_ENTRY_FIELDS": "5",
        "MAX_FIELD_NAME_BYTES": "16",
        "DEAD_LETTER_MAX_BYTES": "4096",
        "MODEL_TYPE": "transformers",
        "MODEL_QUANTIZE": "0",
        "INFERENCE_THREADS": "1",
        "SENTIMENT_MODEL": "a/b",
        "EMOTION_MODEL": "c/d",
        "EMOTION_LABEL_MAP": "love=joy",
        "LLM_PROVIDER": "groq",
        "LLM_API_KEY": "k",
        "LLM_MODEL": "m",
        "LLM_BASE_URL": "http://llm",
        "METRICS_PORT": "0",
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": "json",
        "STREAM_RETENTION": "60",
        "CACHE_ENTRIES": "10",
        "CACHE_MAX_BYTES": "100000",
        "REDIS_CLUSTER": "no",
        "REDIS_STREAM_SHARDS": "3",
        "CONSUMER_REMOVE_IDLE_MS": "5000",
    }
    settings = Settings.from_env(env, dotenv=None)
    assert all(getattr(settings, f.name) != getattr(Settings(), f.name) for f in attrs.fields(Settings))
    assert Settings.from_env(settings.to_env(), dotenv=None) == settings
    assert set(settings.to_env()) == Settings.env_names() - {"REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD"}
