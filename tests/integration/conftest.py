"""Integration tests: the real Redis and PostgreSQL on localhost, and real worker processes.

Each test gets its own stream key and its own PostgreSQL schema (search_path in the DSN), so tests never
see each other's data. Unreachable servers fail the test: these tests are never skipped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import redis

from sentiment.config import Settings

from ..support.servers import PG_URL, REDIS_URL

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything in this folder is an integration test: `-m "not integration"` runs the fast half.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pg_base() -> str:
    dbname = psycopg.conninfo.conninfo_to_dict(PG_URL)["dbname"]
    admin = psycopg.conninfo.make_conninfo(PG_URL, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            conn.execute(f'CREATE DATABASE "{dbname}"')
    return PG_URL


@pytest.fixture
def pg_dsn(pg_base: str) -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{pg_base}?options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(pg_base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def stream_name() -> Iterator[str]:
    name = f"test:{uuid.uuid4().hex[:12]}"
    yield name
    r = redis.Redis.from_url(REDIS_URL)
    r.delete(name, f"{name}:dead", f"{name}:attempts:sentiment_workers")
    r.close()


@pytest.fixture
def rds() -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(REDIS_URL)
    yield r
    r.close()


@pytest.fixture
def settings(pg_dsn: str, stream_name: str) -> Settings:
    return Settings(
        database_url=pg_dsn,
        redis_url=REDIS_URL,
        stream=stream_name,
        consumer="test-worker",
        batch_size=50,
        block_ms=100,
        claim_min_idle_ms=200,
        reclaim_interval_ms=100,
        shutdown_grace_s=5.0,
        model_type="noop",
        metrics_port=0,
    )
