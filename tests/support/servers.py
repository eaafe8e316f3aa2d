"""Helpers for tests that run real worker processes against the real Redis and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import redis

from sentiment.config import Settings
from sentiment.deadletter import DeadEntry, decode

ROOT = Path(__file__).resolve().parent.parent.parent
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/sentiment_test")


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a `python -m sentiment` subprocess with these settings. Without a CONSUMER_NAME
    in `extra`, each process names itself (hostname-pid), as workers do."""
    env = {k: v for k, v in os.environ.items() if k not in Settings.env_names()}
    env.update(settings.to_env(), METRICS_PORT="0", PYTHONPATH=str(ROOT))
    del env["CONSUMER_NAME"]
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # cwd: the tests folder, which holds no .env that could leak settings into the run.
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=ROOT / "tests",
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def rows_so_far(dsn: str) -> int:
    """Analysis rows, or 0 while the worker has not yet created the database or the table."""
    try:
        return rows(dsn)
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
        return 0


def rows(dsn: str, query: str = "SELECT count(*) FROM sentiment_analysis") -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])


def start_worker(env: dict[str, str]) -> subprocess.Popen[str]:
    """`python -m sentiment run` in the background, its log on stderr (read with communicate())."""
    return subprocess.Popen(
        [sys.executable, "-m", "sentiment", "run"],
        cwd=ROOT / "tests",
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def drain(settings: Settings, **extra: str) -> subprocess.CompletedProcess[str]:
    """`python -m sentiment run --drain`, which must exit 0."""
    result = run_cli(["-m", "sentiment", "run", "--drain"], worker_env(settings, **extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def wait_for(check: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def readyz(port: int) -> httpx.Response | None:
    """The worker's /readyz on `port`, or None while nothing answers there."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
    except httpx.TransportError:
        return None


def readyz_text(port: int) -> str:
    answer = readyz(port)
    return answer.text if answer is not None else ""


def llm_env(url: str, **extra: str) -> dict[str, str]:
    """Settings for MODEL_TYPE=llm against the test server at `url`."""
    return {"MODEL_TYPE": "llm", "LLM_PROVIDER": "openai", "LLM_API_KEY": "k", "LLM_BASE_URL": url, **extra}


def publish(r: redis.Redis, stream: str, n: int, prefix: str = "p", as_json: bool = True) -> list[str]:
    """`n` valid posts `<prefix>0…`, as one `data` JSON field or flat fields; their entry IDs."""
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        post = {
            "post_id": f"{prefix}{i}",
            "content": f"post number {i} is good",
            "source": "test",
            "author": "me",
        }
        pipe.xadd(stream, {"data": json.dumps(post)} if as_json else post)
    return [x.decode() for x in pipe.execute()]


def dead_letters(r: redis.Redis, key: str) -> dict[str, DeadEntry]:
    """The dead-letter stream by original entry ID (asserting there is one copy per entry)."""
    letters = [decode(i.decode(), f) for i, f in r.xrange(key)]
    by_entry = {d.entry_id: d for d in letters}
    assert len(by_entry) == len(letters), "an entry was dead-lettered twice"
    return by_entry


def blocked_reads(r: redis.Redis) -> list[int]:
    """The client IDs waiting in a blocking XREADGROUP on this server."""
    return [int(c["id"]) for c in r.client_list() if c["cmd"] == "xreadgroup" and "b" in c["flags"]]
