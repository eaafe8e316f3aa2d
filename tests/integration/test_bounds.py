"""Every wait is bounded, on real servers: SIGTERM while PostgreSQL or Redis hang, a stuck batch handed
over to another worker, start-up without double delivery, retention that fails closed."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import attrs
import httpx
import psycopg
import pytest
import redis
import trio

from sentiment.config import Settings
from sentiment.shutdown import EXIT_MARGIN_S
from sentiment.tools.throwaway import ThrowawayPostgres, ThrowawayRedis, free_port, make_workdir
from sentiment.wiring import open_stream, open_worker

from ..support.fakes import FakeAnalyzer
from ..support.proxy import Cutter, cutting_proxy
from ..support.servers import (
    ROOT,
    drain,
    publish,
    readyz_text,
    rows,
    rows_so_far,
    run_cli,
    wait_for,
    worker_env,
)
from ..support.servers import start_worker as start

GRACE_S = 1.0


def stop_within_bound(proc: subprocess.Popen[str]) -> tuple[float, str]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return time.monotonic() - started, err


def in_the_write(r: redis.Redis, settings: Settings) -> bool:
    """The worker read entries (they are pending) and its write waits for a lock. Pending alone was not
    enough: a SIGTERM between the read and the hand-over to the analysis stage leaves nothing in flight,
    and the worker rightly exits at once (0), the entries pending."""
    try:
        if not r.xpending(settings.stream, settings.group)["pending"]:
            return False
    except redis.ResponseError:  # no group yet
        return False
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    return rows(settings.database_url, waiting) > 0


def all_written_once(settings: Settings, r: redis.Redis, n: int) -> None:
    drain(settings, CLAIM_MIN_IDLE_MS="100", RECLAIM_INTERVAL_MS="100")
    assert rows(settings.database_url) == n
    assert rows(settings.database_url, "SELECT count(DISTINCT post_id) FROM sentiment_analysis") == n
    assert r.xpending(settings.stream, settings.group)["pending"] == 0


def test_sigterm_with_the_table_locked_exits_within_the_bound(settings: Settings, rds: redis.Redis) -> None:
    assert run_cli(["-m", "sentiment", "migrate"], worker_env(settings)).returncode == 0
    locker = psycopg.connect(settings.database_url)
    locker.execute("LOCK TABLE sentiment_analysis IN ACCESS EXCLUSIVE MODE")  # held until rollback
    try:
        proc = start(worker_env(settings, SHUTDOWN_GRACE_S=str(GRACE_S)))
        publish(rds, settings.stream, 20)
        wait_for(lambda: in_the_write(rds, settings), "the worker to block on the lock")
        time.sleep(0.5)
        took, err = stop_within_bound(proc)
        assert took < GRACE_S + EXIT_MARGIN_S, (took, err[-2000:])
        assert "Traceback" not in err
        assert rds.xpending(settings.stream, settings.group)["pending"] > 0
    finally:
        locker.rollback()
        locker.close()
    assert rows_so_far(settings.database_url) == 0  # nothing was written, and so nothing acked
    all_written_once(settings, rds, 20)


def test_a_second_sigterm_exits_at_once(settings: Settings, rds: redis.Redis) -> None:
    assert run_cli(["-m", "sentiment", "migrate"], worker_env(settings)).returncode == 0
    locker = psycopg.connect(settings.database_url)
    locker.execute("LOCK TABLE sentiment_analysis IN ACCESS EXCLUSIVE MODE")
    try:
        proc = start(worker_env(settings, SHUTDOWN_GRACE_S="60"))
        publish(rds, settings.stream, 5)
        wait_for(lambda: in_the_write(rds, settings), "the worker to block on the lock")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 2.0
        assert proc.returncode == 128 + signal.SIGTERM and "exiting now" in err
    finally:
        locker.rollback()
        locker.close()
    all_written_once(settings, rds, 5)


@pytest.fixture
def own_postgres() -> Iterator[ThrowawayPostgres]:
    pg = ThrowawayPostgres(make_workdir() / "pg")
    pg.start()
    yield pg
    pg.resume()
    pg.stop("immediate")


def test_sigterm_with_postgres_frozen_exits_within_the_bound(
    own_postgres: ThrowawayPostgres, settings: Settings, rds: redis.Redis
) -> None:
    frozen = attrs.evolve(settings, database_url=own_postgres.url)
    proc = start(worker_env(frozen, SHUTDOWN_GRACE_S=str(GRACE_S)))
    publish(rds, frozen.stream, 3, prefix="warm")
    wait_for(lambda: rows_so_far(frozen.database_url) == 3, "the worker to run")
    own_postgres.pause()  # SIGSTOP: no answer, no reset, no FIN
    try:
        publish(rds, frozen.stream, 20)
        time.sleep(1.5)
        took, err = stop_within_bound(proc)
        assert took < GRACE_S + EXIT_MARGIN_S, (took, err[-2000:])
    finally:
        own_postgres.resume()
    all_written_once(frozen, rds, 23)


def test_sigterm_with_redis_asleep_exits_within_the_bound(settings: Settings) -> None:
    server = ThrowawayRedis(make_workdir() / "redis", extra_args=("--enable-debug-command", "yes"))
    server.start()
    try:
        asleep = attrs.evolve(settings, redis_url=server.url)
        client = redis.Redis.from_url(server.url)
        proc = start(worker_env(asleep, SHUTDOWN_GRACE_S=str(GRACE_S)))
        publish(client, asleep.stream, 3, prefix="warm")
        wait_for(lambda: rows_so_far(asleep.database_url) == 3, "the worker to run")
        publish(client, asleep.stream, 20)
        sleeper = threading.Thread(
            target=lambda: redis.Redis.from_url(server.url, socket_timeout=60).execute_command(
                "DEBUG", "SLEEP", "15"
            )
        )
        sleeper.start()
        time.sleep(0.5)
        took, err = stop_within_bound(proc)
        assert took < GRACE_S + EXIT_MARGIN_S, (took, err[-2000:])
        sleeper.join()
        all_written_once(asleep, client, 23)
        client.close()
    finally:
        server.stop()


def test_a_stuck_batch_is_taken_over_by_a_healthy_worker(settings: Settings, rds: redis.Redis) -> None:
    assert run_cli(["-m", "sentiment", "migrate"], worker_env(settings)).returncode == 0
    host = psycopg.conninfo.conninfo_to_dict(settings.database_url)
    cutter = Cutter()
    port = free_port()
    with cutting_proxy(int(host.get("port") or 5432), cutter) as pg_port:
        stuck_dsn = settings.database_url.replace("127.0.0.1:5432", f"127.0.0.1:{pg_port}")
        env = {"CLAIM_MIN_IDLE_MS": "1500", "RECLAIM_INTERVAL_MS": "200", "STUCK_BATCH_S": "1"}
        first = start(
            worker_env(settings, **env, DATABASE_URL=stuck_dsn, CONSUMER_NAME="a", METRICS_PORT=str(port))
        )
        try:
            publish(rds, settings.stream, 2, prefix="warm")
            wait_for(lambda: rows_so_far(settings.database_url) == 2, "worker a to run")
            cutter.frozen.set()  # a's connection hangs: the server never answers, nothing is closed
            publish(rds, settings.stream, 10)
            wait_for(lambda: "stuck" in httpx.get(f"http://127.0.0.1:{port}/healthz").text, "a's healthz")
            health = httpx.get(f"http://127.0.0.1:{port}/healthz")
            assert health.status_code == 503 and "leases are released" in health.text
            second = start(worker_env(settings, **env, CONSUMER_NAME="b"))
            wait_for(lambda: rows(settings.database_url) == 12, "worker b to take the batch over")
            second.terminate()
            second.communicate(timeout=30)
        finally:
            cutter.frozen.clear()
            first.terminate()
            _, err = first.communicate(timeout=30)
    assert "made no progress" in err and "releasing the leases" in err
    all_written_once(settings, rds, 12)


async def test_start_up_reads_each_entry_once(settings: Settings, rds: redis.Redis) -> None:
    """Own pending entries (over ten pages) and a dead consumer's, some deleted from the stream: the
    reclaimer waits for the re-read, so each entry is analysed once, delivered once more, none left."""
    tuned = attrs.evolve(settings, batch_size=5, claim_min_idle_ms=1, reclaim_interval_ms=50)
    publish(rds, tuned.stream, 80)
    rds.xgroup_create(tuned.stream, tuned.group, id="0")
    rds.xreadgroup(tuned.group, tuned.consumer, {tuned.stream: ">"}, count=60)  # ours, from a past life
    rds.xreadgroup(tuned.group, "dead", {tuned.stream: ">"}, count=20)
    ids = [i.decode() for i, _ in rds.xrange(tuned.stream)]
    rds.xdel(tuned.stream, ids[3], ids[4], ids[70])
    before = {
        p["message_id"].decode(): p["times_delivered"]
        for p in rds.xpending_range(tuned.stream, tuned.group, "-", "+", 100)
    }
    await trio.sleep(0.01)
    analyzer = FakeAnalyzer()
    async with open_worker(tuned, analyzer) as worker:
        seen: list[tuple[str, int]] = []
        analyse = worker.processor.analyse

        async def recording(entries):  # type: ignore[no-untyped-def]
            seen.extend((e.id, e.deliveries) for e in entries)
            return await analyse(entries)

        worker.processor.analyse = recording  # type: ignore[method-assign]
        with trio.fail_after(60):
            await worker.run(drain=True)
    assert sorted(t for call in analyzer.calls for t in call) == sorted(
        f"post number {i} is good" for i in range(80) if i not in (3, 4, 70)
    )
    assert all(deliveries == before[i] + 1 for i, deliveries in seen), seen
    assert len(seen) == 77
    assert rds.xpending(tuned.stream, tuned.group)["pending"] == 0
    assert rows(tuned.database_url) == 77


async def test_retention_keeps_what_any_group_owes_and_fails_closed(
    settings: Settings, rds: redis.Redis
) -> None:
    tuned = attrs.evolve(settings, stream_retention_s=1, claim_min_idle_ms=600_000)
    publish(rds, tuned.stream, 30)
    ids = [i.decode() for i, _ in rds.xrange(tuned.stream)]
    rds.xgroup_create(tuned.stream, tuned.group, id="0")
    rds.xgroup_create(tuned.stream, "laggard", id="0")
    rds.xreadgroup("laggard", "l", {tuned.stream: ">"}, count=20)  # a second group, behind
    rds.xack(tuned.stream, "laggard", *ids[:20])
    rds.xreadgroup(tuned.group, "dead", {tuned.stream: ">"}, count=10)  # ours: 0..9 read by a dead one
    rds.xack(tuned.stream, tuned.group, *ids[:5], *ids[6:10])  # ... which left entry 5 pending
    await trio.sleep(1.2)  # everything is older than the retention now
    async with open_worker(tuned, FakeAnalyzer()) as worker, trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        with trio.fail_after(30):
            while rows_so_far(tuned.database_url) < 20:  # noqa: ASYNC110 - polling PostgreSQL
                await trio.sleep(0.05)
            await trio.sleep(2.5)  # a few retention rounds
        worker.stop()
    kept = [i.decode() for i, _ in rds.xrange(tuned.stream)]
    assert kept == ids[5:], "only entries every group has read and acked, below the oldest pending, go"

    # The race: XINFO says a group has pending entries, XPENDING then finds none.
    async with open_stream(tuned) as stream:
        groups = await stream._groups()
        rds.xack(tuned.stream, tuned.group, ids[5])
        stream._groups = lambda: _coro(groups)  # type: ignore[method-assign]
        await stream.trim_acked(1000)
    assert next(i.decode() for i, _ in rds.xrange(tuned.stream)) == ids[20]  # the laggard still owes 20..


async def _coro(value: object) -> object:
    return value


def test_retention_skips_when_group_state_cannot_be_read(settings: Settings, rds: redis.Redis) -> None:
    user = f"noxinfo_{settings.stream.split(':')[1]}"
    rds.execute_command("ACL", "SETUSER", user, "on", "nopass", "~*", "+@all", "-xinfo")
    try:
        publish(rds, settings.stream, 5)
        time.sleep(1.1)
        denied = attrs.evolve(settings, redis_url=f"redis://{user}@127.0.0.1:6379/0")
        # The monitor reads XINFO too (every 5 s, the first at once), and the reclaimer's consumer
        # removal (a script that calls XINFO): neither may stop the worker.
        port = free_port()
        env = worker_env(denied, STREAM_RETENTION="1", CLAIM_MIN_IDLE_MS="600000", METRICS_PORT=str(port))
        proc = start(env | {"CONSUMER_REMOVE_IDLE_MS": "1000", "RECLAIM_INTERVAL_MS": "100"})
        try:
            wait_for(lambda: rows_so_far(settings.database_url) == 5, "the rows")
            time.sleep(2.5)
            assert proc.poll() is None
            # Ready: Redis answers, and the worker works; only the backlog figures are missing.
            assert readyz_text(port).startswith("ready"), readyz_text(port)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        assert rds.xlen(settings.stream) == 5  # nothing trimmed on incomplete information
        assert sum("retention skipped" in line for line in err.splitlines()) == 1, err
        assert sum("figures not read" in line for line in err.splitlines()) == 1, err
        assert "Traceback" not in err
    finally:
        rds.execute_command("ACL", "DELUSER", user)


SECRET = "s3cr3t-Pa55"


def test_passwords_in_urls_never_appear_in_any_output(settings: Settings, rds: redis.Redis) -> None:
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port := free_port()),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--requirepass",
            SECRET,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(port), "redis-server")
        pg = f"{settings.database_url}&password={SECRET}"  # trust auth: accepted and ignored
        forms = {
            "query": {"REDIS_URL": f"redis://127.0.0.1:{port}/0?password={SECRET}", "DATABASE_URL": pg},
            "userinfo": {"REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{port}/0", "DATABASE_URL": pg},
            "wrong": {"REDIS_URL": f"redis://127.0.0.1:{port}/0?password=not-{SECRET}", "DATABASE_URL": pg},
            # REDIS_PASSWORD beside REDIS_HOST/REDIS_PORT, JSON logs.
            "variables": {
                "REDIS_URL": "",
                "REDIS_HOST": "127.0.0.1",
                "REDIS_PORT": str(port),
                "REDIS_PASSWORD": SECRET,
                "DATABASE_URL": pg,
                "LOG_FORMAT": "json",
            },
            # libpq reads `#` as part of the value; a URL parser would take the rest for a fragment.
            "hash": {
                "REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{port}/0",
                "DATABASE_URL": f"{settings.database_url}&password=x%23{SECRET}#{SECRET}",
            },
            # libpq's keyword/value form is refused (a URL is needed), without echoing the password.
            "keywords": {
                "REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{port}/0",
                "DATABASE_URL": f"host=127.0.0.1 user=postgres password={SECRET} dbname=sentiment_test",
            },
        }
        for form, urls in forms.items():
            env = worker_env(settings, **urls, LOG_LEVEL="DEBUG")
            for args in (
                ["--help"],
                ["run", "--help"],
                ["migrate"],
                ["stats"],
                ["stats", "--json"],
                ["deadletter", "list"],
                ["reanalyze", "--dry-run"],
            ):
                result = run_cli(["-m", "sentiment", *args], env, timeout=60)
                assert SECRET not in result.stdout + result.stderr, (form, args, result.stderr[-1000:])
            proc = start(env)
            time.sleep(3)
            _, err = stop_within_bound(proc)
            assert SECRET not in err, (form, err[-1000:])
            reclaim = run_cli([str(ROOT / "scripts/reclaim.py"), "--dry-run"], env, timeout=60)
            assert SECRET not in reclaim.stdout + reclaim.stderr
    finally:
        server.terminate()
        server.wait()


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, password=SECRET, socket_timeout=1).ping())
    except redis.RedisError:
        return False
