"""Faults the worker must ride out, on real servers: outages, a cut commit, a failed ack, slow batches,
a poison text, retention. Outages use throwaway servers that only these tests stop and restart."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import attrs
import psycopg
import pytest
import redis
import trio
import trio_asyncio

from sentiment.config import Settings
from sentiment.deadletter import decode
from sentiment.errors import StreamUnavailable
from sentiment.tools.throwaway import ThrowawayPostgres, ThrowawayRedis, free_port, make_workdir
from sentiment.wiring import build_worker, open_parts, open_worker, run_reclaim

from ..support.fakes import FakeAnalyzer
from ..support.servers import (
    ROOT,
    blocked_reads,
    readyz_text,
    rows,
    rows_so_far,
    start_worker,
    wait_for,
    worker_env,
)


def publish(r: redis.Redis, stream: str, ids: range, text: str = "fine text") -> None:
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.xadd(stream, {"post_id": f"p{i}", "content": f"{text} {i}"})
    pipe.execute()


@pytest.fixture
def servers() -> Iterator[tuple[ThrowawayRedis, ThrowawayPostgres]]:
    work = make_workdir()
    r, pg = ThrowawayRedis(work / "redis"), ThrowawayPostgres(work / "pg")
    r.start()
    pg.start()
    yield r, pg
    r.stop()
    pg.stop("immediate")


def test_redis_and_postgres_outages_of_10s_lose_nothing(
    servers: tuple[ThrowawayRedis, ThrowawayPostgres],
) -> None:
    r, pg = servers
    settings = Settings(database_url=pg.url, redis_url=r.url, stream="faults", model_type="noop")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentiment", "run"],
        cwd=ROOT / "tests",
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(settings, BATCH_SIZE="20", BLOCK_MS="200", CLAIM_MIN_IDLE_MS="5000"),
    )
    client = redis.Redis.from_url(r.url)
    try:
        publish(client, "faults", range(0, 500))
        _wait_rows(pg.url, 500)
        r.restart(down_for=10.0)  # Redis gone for 10 s mid-run
        publish(client, "faults", range(500, 1000))
        pg.stop()  # PostgreSQL gone for 10 s, with posts arriving
        publish(client, "faults", range(1000, 1500))
        time.sleep(10.0)
        pg.start()
        _wait_rows(pg.url, 1500)
        assert proc.poll() is None, "the worker must not exit during outages"
        deadline = time.monotonic() + 10  # the last batch's ack follows its commit
        while client.xpending("faults", "sentiment_workers")["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.xpending("faults", "sentiment_workers")["pending"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=60)
        client.close()
    assert proc.returncode == 0, log
    assert rows(pg.url, "SELECT count(DISTINCT post_id) FROM sentiment_analysis") == 1500
    assert log.count("Redis unavailable") == 1, log
    assert log.count("PostgreSQL unavailable") == 1, log
    assert "Redis is back" in log and "PostgreSQL is back" in log


def test_a_blocking_read_the_server_ends_is_read_again(settings: Settings, rds: redis.Redis) -> None:
    # Redis ends a blocked XREADGROUP with an UNBLOCKED error when its master stops serving the key (a
    # graceful failover, a slot migrated away: in review on a cluster, every idle worker exited 1 at
    # once), when the key is deleted, or on CLIENT UNBLOCK. Not a post's fault: read again.
    worker = start_worker(worker_env(settings, BLOCK_MS="10000"))

    def stored(n: int) -> None:
        wait_for(lambda: worker.poll() is not None or rows_so_far(settings.database_url) >= n, f"{n} rows")
        assert worker.poll() is None, "the worker exited"

    try:
        publish(rds, settings.stream, range(0, 10))
        stored(10)
        wait_for(lambda: any(rds.client_unblock(c, error=True) for c in blocked_reads(rds)), "a read")
        publish(rds, settings.stream, range(10, 20))
        stored(20)
        wait_for(lambda: blocked_reads(rds), "a read")
        rds.delete(settings.stream)  # "UNBLOCKED the stream key no longer exists"; the group goes too
        publish(rds, settings.stream, range(20, 30))
        stored(30)
    finally:
        worker.send_signal(signal.SIGTERM)
        log = worker.communicate(timeout=60)[1]
    assert worker.returncode == 0 and "Traceback" not in log, log[-3000:]
    assert rows(settings.database_url, "SELECT count(DISTINCT post_id) FROM sentiment_analysis") == 30


def test_one_shard_refused_is_one_outage_in_the_log(settings: Settings) -> None:
    # One shard's calls fail while the others' succeed (one master down on a cluster; here an ACL that
    # stops covering shard 1's keys). With one Redis flag for all shards the log said "unavailable" and
    # "back after 0.0 s" by turns, many times a second (seen in review); now each shard says it once.
    work = make_workdir()
    r = ThrowawayRedis(work / "redis")
    r.start()
    admin = redis.Redis.from_url(r.url)
    try:
        admin.acl_setuser("w", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"])
        s = attrs.evolve(settings, redis_url=f"redis://w:pw@127.0.0.1:{r.port}/0", stream_shards=2)
        keys = s.keys(cluster=False)
        port = free_port()
        worker = start_worker(worker_env(s, METRICS_PORT=str(port)))
        try:
            for i, k in enumerate(keys):
                publish(admin, k.stream, range(100 * i, 100 * i + 10))
            wait_for(lambda: rows_so_far(s.database_url) == 20, "20 rows")
            shard_0 = [keys[0].stream, keys[0].dead, keys[0].attempts]
            admin.acl_setuser("w", enabled=True, reset_keys=True, keys=shard_0)  # (enabled: else "off")
            for i, k in enumerate(keys):
                publish(admin, k.stream, range(100 * i + 10, 100 * i + 20))
            # Shard 0's: p0 to p19. (Shard 1 may have read some of its new posts just before and written
            # them; their acks wait.)
            shard_0_rows = "SELECT count(*) FROM sentiment_analysis WHERE length(post_id) <= 3"
            wait_for(lambda: rows(s.database_url, shard_0_rows) == 20, "shard 0's posts")
            wait_for(lambda: keys[1].stream in readyz_text(port), "/readyz naming shard 1")
            time.sleep(5)  # shard 0 keeps reading (every BLOCK_MS) while shard 1 retries
            admin.acl_setuser("w", enabled=True, keys=["*"])
            wait_for(lambda: rows(s.database_url) == 40, "shard 1's posts")
            wait_for(lambda: readyz_text(port).startswith("ready"), "ready again")
        finally:
            worker.send_signal(signal.SIGTERM)
            log = worker.communicate(timeout=60)[1]
    finally:
        admin.close()
        r.stop()
        shutil.rmtree(work, ignore_errors=True)
    assert worker.returncode == 0, log[-3000:]
    said = [x for x in log.splitlines() if "unavailable" in x or "is back" in x]
    assert len(said) == 2, said
    assert (
        f"Redis ({keys[1].stream}) unavailable" in said[0] and f"Redis ({keys[1].stream}) is back" in said[1]
    )


def _wait_rows(dsn: str, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rows_so_far(dsn) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} rows after {timeout:g} s")


async def test_connection_cut_at_commit_is_retried_without_double_rows(
    settings: Settings, rds: redis.Redis
) -> None:
    publish(rds, settings.stream, range(30))
    async with open_parts(settings, FakeAnalyzer()) as parts:
        await parts.store.migrate()
    # A deferred trigger kills the writing backend at COMMIT, once: the rows were sent, the commit fails.
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("""
            CREATE SEQUENCE cut_once;
            CREATE FUNCTION cut_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('cut_once') = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
                RETURN NULL;
            END $$;
            CREATE CONSTRAINT TRIGGER cut AFTER INSERT ON sentiment_analysis
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION cut_at_commit();
        """)
    async with open_worker(settings, FakeAnalyzer()) as worker:
        with trio.fail_after(60):
            await worker.run(drain=True)
    assert rows(settings.database_url, "SELECT last_value FROM cut_once") > 1  # it fired, and the retry wrote
    assert rows(settings.database_url) == 30
    assert rows(settings.database_url, "SELECT count(DISTINCT post_id) FROM sentiment_analysis") == 30
    assert int(rds.xpending(settings.stream, settings.group)["pending"]) == 0


async def test_failed_ack_after_commit_is_redelivered_and_absorbed(
    settings: Settings, rds: redis.Redis
) -> None:
    publish(rds, settings.stream, range(20))
    fast_stop = attrs.evolve(settings, shutdown_grace_s=0.5)
    async with open_parts(fast_stop, FakeAnalyzer()) as parts:

        async def blip(ids: object) -> None:
            raise StreamUnavailable("injected: XACK lost")

        parts.stream.ack = blip  # type: ignore[method-assign]
        worker = build_worker(fast_stop, parts)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            await wait_rows(settings.database_url, 20)
            worker.stop()  # the ack keeps failing: the grace period ends it, entries stay pending
    assert rows(settings.database_url) == 20
    assert int(rds.xpending(settings.stream, settings.group)["pending"]) == 20
    async with open_worker(settings, FakeAnalyzer()) as again:
        await again.run(drain=True)
    assert again.totals.duplicates == 20  # redelivered; ON CONFLICT absorbed every one
    assert rows(settings.database_url) == 20
    assert int(rds.xpending(settings.stream, settings.group)["pending"]) == 0


async def wait_rows(dsn: str, n: int) -> None:
    with trio.fail_after(60):
        while rows_so_far(dsn) < n:  # noqa: ASYNC110 - polling PostgreSQL, not a trio task
            await trio.sleep(0.05)


class SlowAnalyzer(FakeAnalyzer):
    """Takes `seconds` of real time per batch, in a worker thread like a real model."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def analyze(self, texts: list[str]) -> list:  # type: ignore[override]
        await trio.to_thread.run_sync(time.sleep, self.seconds)
        return await super().analyze(texts)


async def test_slow_batches_keep_their_lease_from_a_second_worker(
    settings: Settings, rds: redis.Redis
) -> None:
    publish(rds, settings.stream, range(40))
    tuned = attrs.evolve(settings, batch_size=10, claim_min_idle_ms=300, reclaim_interval_ms=50)
    a, b = SlowAnalyzer(1.0), SlowAnalyzer(1.0)  # each batch takes over 3x CLAIM_MIN_IDLE_MS
    with trio.fail_after(60):
        async with (
            trio_asyncio.open_loop(),  # one loop for both workers in this process
            open_worker(attrs.evolve(tuned, consumer="w1"), a) as w1,
            open_worker(attrs.evolve(tuned, consumer="w2"), b) as w2,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(lambda: w1.run(drain=True))
            nursery.start_soon(lambda: w2.run(drain=True))
    analysed = [t for calls in (a.calls, b.calls) for batch in calls for t in batch]
    assert sorted(analysed) == sorted(f"fine text {i}" for i in range(40))  # each exactly once
    assert rows(settings.database_url) == 40


async def test_one_failing_text_is_isolated_then_dead_lettered(settings: Settings, rds: redis.Redis) -> None:
    publish(rds, settings.stream, range(9))
    rds.xadd(settings.stream, {"post_id": "poison", "content": "POISON"})
    tuned = attrs.evolve(settings, max_deliveries=2, claim_min_idle_ms=50, reclaim_interval_ms=20)
    async with open_worker(tuned, FakeAnalyzer()) as worker:
        with trio.fail_after(60):
            await worker.run(drain=True)
    assert rows(settings.database_url) == 9
    [(dead_id, fields)] = rds.xrange(settings.dead_letter)
    letter = decode(dead_id.decode(), fields)
    assert letter.original[b"post_id"] == b"poison" and letter.deliveries == 2
    assert letter.reason.startswith("analysis failed 2 times: ModelError: poisoned text")
    assert worker.totals.retried == 1


async def test_retention_never_trims_pending_work(settings: Settings, rds: redis.Redis) -> None:
    publish(rds, settings.stream, range(10))
    rds.xgroup_create(settings.stream, settings.group, id="0")
    rds.xreadgroup(settings.group, "dead-consumer", {settings.stream: ">"}, count=3)  # p0-p2: pending
    publish(rds, settings.stream, range(10, 20))
    # Another consumer processes and acks the rest (the dead consumer's entries are too fresh to reclaim).
    patient = attrs.evolve(settings, claim_min_idle_ms=10**8)
    async with open_parts(patient, FakeAnalyzer()) as parts:
        worker = build_worker(patient, parts)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            await wait_rows(settings.database_url, 17)
            worker.stop()
        assert await parts.stream.trim_acked(0) == 0  # the oldest entries are pending: none may go
    assert rds.xlen(settings.stream) == 20
    await trio.sleep(0.01)
    async with open_parts(settings, FakeAnalyzer()) as parts:
        assert (await run_reclaim(settings, 1, analyzer=FakeAnalyzer())).processed == 3
        assert await parts.stream.trim_acked(0) == 20  # all acked now: all may go
    assert rows(settings.database_url) == 20
