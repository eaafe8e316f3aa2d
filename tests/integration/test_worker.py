"""The worker against the real Redis and PostgreSQL: what only the servers can show."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import attrs
import psycopg
import redis
import trio

from sentiment.config import Settings
from sentiment.deadletter import decode
from sentiment.entries import id_key
from sentiment.errors import StoreUnavailable
from sentiment.rows import Record, WriteResult
from sentiment.store import PostgresStore
from sentiment.wiring import build_worker, open_parts, open_worker, run_reclaim
from sentiment.worker import Worker

from ..support.fakes import FakeAnalyzer
from ..support.servers import ROOT, publish, rows, rows_so_far, run_cli, worker_env


def pending(r: redis.Redis, s: Settings) -> int:
    return int(r.xpending(s.stream, s.group)["pending"])


def read_by_a_dead_consumer(r: redis.Redis, s: Settings) -> None:
    """Every entry so far delivered to "dead-consumer", which never acks: pending for reclaim."""
    r.xgroup_create(s.stream, s.group, id="0")
    r.xreadgroup(s.group, "dead-consumer", {s.stream: ">"}, count=100)


async def drain(settings: Settings, analyzer: FakeAnalyzer | None = None) -> Worker:
    async with open_worker(settings, analyzer) as worker:
        with trio.fail_after(60):
            await worker.run(drain=True)
        return worker


async def test_drain_writes_posts_and_results(settings: Settings, rds: redis.Redis) -> None:
    publish(rds, settings.stream, 40)
    rds.xadd(
        settings.stream,
        {"post_id": "flat", "content": "flat fields", "created_at": "2024-05-01T12:00:00+02:00"},
    )
    await drain(settings, FakeAnalyzer())
    assert rows(settings.database_url) == 41
    assert pending(rds, settings) == 0
    with psycopg.connect(settings.database_url) as conn:
        created, sentiment, scores, entry = conn.execute(
            "SELECT p.created_at, a.sentiment, a.scores, a.stream_entry_id FROM social_media_posts p "
            "JOIN sentiment_analysis a USING (post_id) WHERE post_id = 'flat'"
        ).fetchone()  # type: ignore[misc]
    assert created.isoformat() == "2024-05-01T10:00:00+00:00"
    assert sentiment == "positive" and scores["sentiment"]["positive"] == 1.0
    assert "-" in entry


class FailingStore(PostgresStore):
    """The real store, with the first `fail` writes failing like a connection cut before commit."""

    def __init__(self, dsn: str, fail: int) -> None:
        super().__init__(dsn)
        self.fail = fail
        self.seen_pending: list[int] = []

    async def write(self, records: list[Record]) -> WriteResult:  # type: ignore[override]
        if self.fail:
            self.fail -= 1
            raise StoreUnavailable("injected: commit failed")
        return await super().write(records)


async def test_failed_commit_leaves_entry_pending_until_retry_succeeds(
    settings: Settings, rds: redis.Redis
) -> None:
    publish(rds, settings.stream, 5)
    async with open_parts(settings, FakeAnalyzer()) as parts:
        store = FailingStore(settings.database_url, fail=3)
        await store.migrate()
        worker = build_worker(settings, attrs.evolve(parts, store=store))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: worker.run(drain=True))
            while store.fail:
                await trio.sleep(0.005)
                if store.fail < 3:  # a commit has failed: nothing may be acked yet
                    store.seen_pending.append(pending(rds, settings))
        await store.aclose()
    assert store.seen_pending and all(p == 5 for p in store.seen_pending)
    assert rows(settings.database_url) == 5 and pending(rds, settings) == 0


async def test_dead_consumer_entries_reclaimed_exactly_once(settings: Settings, rds: redis.Redis) -> None:
    publish(rds, settings.stream, 30)
    read_by_a_dead_consumer(rds, settings)
    await trio.sleep(0.01)  # let the entries age past min_idle_ms on Redis's clock
    analyzer = FakeAnalyzer()
    report = await run_reclaim(settings, 1, analyzer=analyzer)
    assert report.as_dict() == {"claimed": 30, "processed": 30, "dead_lettered": 0, "deleted": 0}
    assert sum(len(c) for c in analyzer.calls) == 30
    assert rows(settings.database_url) == 30 and pending(rds, settings) == 0
    # A second pass finds nothing: exactly once.
    assert (await run_reclaim(settings, 1, analyzer=analyzer)).claimed == 0


async def test_reclaim_takes_an_over_delivered_entry_and_those_before_it_one_at_a_time(
    settings: Settings, rds: redis.Redis
) -> None:
    ids = publish(rds, settings.stream, 5)
    read_by_a_dead_consumer(rds, settings)
    rds.xclaim(settings.stream, settings.group, "dead-consumer", 0, [ids[2]], retrycount=9)  # over 5
    await trio.sleep(0.01)  # let the entries age past min_idle_ms on Redis's clock
    analyzer = FakeAnalyzer()
    report = await run_reclaim(settings, 1, analyzer=analyzer)
    assert report.processed == 5 and pending(rds, settings) == 0
    # A page that holds an entry delivered more than MAX_DELIVERIES times is taken one entry at a time
    # (as the worker does): p0, p1, then p2 on its own, then the rest together.
    texts = [f"post number {i} is good" for i in range(5)]
    assert analyzer.calls == [[texts[0]], [texts[1]], [texts[2]], texts[3:]]


async def test_redelivered_entry_adds_no_row(settings: Settings, rds: redis.Redis) -> None:
    publish(rds, settings.stream, 1)
    await drain(settings)
    # Deliver it again as if the ack had been lost: a second delivery and a second write.
    rds.xadd(settings.stream, {"data": json.dumps({"post_id": "p0", "content": "post number 0 is good"})})
    worker = await drain(settings)
    assert worker.totals.duplicates == 1
    assert rows(settings.database_url) == 1
    assert rows(settings.database_url, "SELECT count(*) FROM social_media_posts") == 1


async def test_invalid_goes_to_dead_letter_and_over_max_deliveries_is_still_written(
    settings: Settings, rds: redis.Redis
) -> None:
    bad = rds.xadd(settings.stream, {"data": "{not json"}).decode()
    [tired] = publish(rds, settings.stream, 1, prefix="tired")
    read_by_a_dead_consumer(rds, settings)
    # Pretend `tired` was delivered 9 times already (MAX_DELIVERIES is 5).
    rds.xclaim(settings.stream, settings.group, "dead-consumer", 0, [tired], retrycount=9)
    await trio.sleep(0.01)  # let the entries age past min_idle_ms on Redis's clock
    report = await run_reclaim(attrs.evolve(settings, claim_min_idle_ms=1), 1)
    # Deliveries are not attempts: `tired` never failed on its own account, so it is written.
    assert report.dead_lettered == 1 and report.processed == 1
    [(dead_id, fields)] = rds.xrange(settings.dead_letter)
    letter = decode(dead_id.decode(), fields)
    assert letter.entry_id == bad
    assert letter.reason.startswith("invalid post: field data is not valid JSON")
    assert letter.original == {b"data": b"{not json"}  # original fields kept
    assert letter.deliveries == 2 and letter.consumer == settings.consumer  # read, then reclaimed
    assert pending(rds, settings) == 0 and rows(settings.database_url) == 1


async def test_pending_entry_deleted_from_stream_counts_as_deleted(
    settings: Settings, rds: redis.Redis
) -> None:
    ids = publish(rds, settings.stream, 3)
    read_by_a_dead_consumer(rds, settings)
    rds.xdel(settings.stream, ids[1])
    await trio.sleep(0.01)  # let the entries age past min_idle_ms on Redis's clock
    report = await run_reclaim(settings, 1)
    assert report.as_dict() == {"claimed": 2, "processed": 2, "dead_lettered": 0, "deleted": 1}
    assert pending(rds, settings) == 0


def test_reclaim_script_prints_json_and_dry_run_lists(settings: Settings, rds: redis.Redis) -> None:
    publish(rds, settings.stream, 4)
    read_by_a_dead_consumer(rds, settings)
    time.sleep(0.01)  # let the entries age past min_idle_ms on Redis's clock
    env = worker_env(settings)
    dry = run_cli([str(ROOT / "scripts/reclaim.py"), "--dry-run", "--min-idle-ms", "1"], env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("dead-consumer") == 4
    assert pending(rds, settings) == 4  # nothing claimed
    done = run_cli([str(ROOT / "scripts/reclaim.py"), "--min-idle-ms", "1"], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "claimed": 4,
        "processed": 4,
        "dead_lettered": 0,
        "deleted": 0,
    }
    assert rows(settings.database_url) == 4


def test_the_reclaim_command_waits_a_locked_table_out(settings: Settings, rds: redis.Redis) -> None:
    """Found by review: a reclaim that gave up after STUCK_BATCH_S left its pages pending and exited 1.
    Like the worker, it waits; its commit is bounded only by the server's lock timeout and retries."""
    publish(rds, settings.stream, 5)
    run_cli(["-m", "sentiment", "migrate"], worker_env(settings))
    read_by_a_dead_consumer(rds, settings)
    env = worker_env(settings, STUCK_BATCH_S="1")
    with psycopg.connect(settings.database_url) as lock:
        lock.execute("LOCK TABLE sentiment_analysis IN EXCLUSIVE MODE")  # held until the block ends
        reclaim = subprocess.Popen(
            [sys.executable, "-m", "sentiment", "reclaim", "--min-idle-ms", "1"],
            cwd=ROOT / "tests",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4)  # several STUCK_BATCH_S over, with the page claimed and its write blocked
        assert reclaim.poll() is None, reclaim.communicate()[1][-2000:]
    out, err = reclaim.communicate(timeout=120)
    assert reclaim.returncode == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1])["processed"] == 5
    assert rows(settings.database_url) == 5 and pending(rds, settings) == 0


def test_three_workers_share_the_stream(settings: Settings, rds: redis.Redis) -> None:
    publish(rds, settings.stream, 3000)
    rds.xgroup_create(settings.stream, settings.group, id="0")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sentiment", "run", "--drain"],
            cwd=ROOT / "tests",
            env=worker_env(settings, CONSUMER_NAME=f"w{i}", CLAIM_MIN_IDLE_MS="60000"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert rows(settings.database_url) == 3000
    assert rows(settings.database_url, "SELECT count(DISTINCT post_id) FROM sentiment_analysis") == 3000
    assert pending(rds, settings) == 0
    consumers = {c["name"].decode() for c in rds.xinfo_consumers(settings.stream, settings.group)}
    assert consumers == {"w0", "w1", "w2"}


def test_sigterm_mid_run_acks_nothing_unwritten(settings: Settings, rds: redis.Redis) -> None:
    ids = publish(rds, settings.stream, 20_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentiment", "run"],
        cwd=ROOT / "tests",
        env=worker_env(settings, BATCH_SIZE="100", CLAIM_MIN_IDLE_MS="600000"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while rows_so_far(settings.database_url) == 0:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    written = rows(settings.database_url)
    assert 0 < written < 20_000, "stopped mid-run"
    with psycopg.connect(settings.database_url) as conn:
        stored = {r[0] for r in conn.execute("SELECT stream_entry_id FROM sentiment_analysis")}
    still_pending = {
        p["message_id"].decode()
        for p in rds.xpending_range(settings.stream, settings.group, "-", "+", 30_000)
    }
    last = rds.xinfo_groups(settings.stream)[0]["last-delivered-id"].decode()
    delivered = [i for i in ids if id_key(i) <= id_key(last)]
    acked = set(delivered) - still_pending
    assert acked <= stored  # nothing acked that is not in the database
    assert "stopping" in err


def test_bad_setting_exits_2_with_one_line(settings: Settings) -> None:
    result = run_cli(["-m", "sentiment", "run"], worker_env(settings, BATCH_SIZE="lots"))
    assert result.returncode == 2
    assert result.stderr.strip() == "sentiment: BATCH_SIZE must be an integer from 1 to 10000, got 'lots'"


def test_migrate_creates_the_database_and_is_idempotent(pg_base: str) -> None:
    name = f"sentiment_new_{os.getpid()}"
    dsn = f"{pg_base.rsplit('/', 1)[0]}/{name}"
    env = {**os.environ, "DATABASE_URL": dsn, "PYTHONPATH": str(ROOT)}
    try:
        for _ in range(2):
            result = run_cli(["-m", "sentiment", "migrate"], env)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == "schema at version 2"
        assert rows(dsn, "SELECT count(*) FROM schema_version") == 2  # one row per migration
    finally:
        with psycopg.connect(
            psycopg.conninfo.make_conninfo(pg_base, dbname="postgres"), autocommit=True
        ) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name}")


def test_a_worker_analyses_a_repeated_text_once_with_the_result_of_an_uncached_run(
    settings: Settings, rds: redis.Redis
) -> None:
    """The real model in a real worker: retweets naming other users and links are cache hits."""
    base = ["I love this so much!", "@bob worst service ever http://x.co", "meh, ok I guess"]
    texts = base + [f"@user{i} worst service ever https://t.co/{i}" for i in range(4)] + base
    plain_stream = f"{settings.stream}:plain"
    for stream, prefix in ((settings.stream, "c"), (plain_stream, "u")):
        for i, text in enumerate(texts):
            rds.xadd(stream, {"post_id": f"{prefix}{i}", "content": text})
    # fp32: int8 scores depend on a text's chunk mates (one activation scale per chunk), cache or not.
    env = worker_env(settings, MODEL_TYPE="embedded", INFERENCE_THREADS="1", MODEL_QUANTIZE="0")
    cached = run_cli(["-m", "sentiment", "run", "--drain"], env, timeout=300)
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert "repeated texts served from the cache 7" in cached.stderr  # 10 posts, 3 distinct texts
    plain_env = {**env, "REDIS_STREAM_NAME": plain_stream, "DEAD_LETTER_STREAM": "", "CACHE_ENTRIES": "0"}
    try:
        plain = run_cli(["-m", "sentiment", "run", "--drain"], plain_env, timeout=300)
    finally:
        rds.delete(plain_stream, f"{plain_stream}:dead", f"{plain_stream}:attempts:{settings.group}")
    assert plain.returncode == 0 and "served from the cache" not in plain.stderr, plain.stderr[-2000:]
    with psycopg.connect(settings.database_url) as conn:
        found = dict(conn.execute("SELECT post_id, scores FROM sentiment_analysis").fetchall())
    assert len(found) == 2 * len(texts)
    for i in range(len(texts)):
        got, want = found[f"c{i}"], found[f"u{i}"]
        for head in ("sentiment", "emotion"):
            assert max(got[head], key=got[head].get) == max(want[head], key=want[head].get)
            assert all(abs(got[head][k] - want[head][k]) < 1e-4 for k in want[head]), (i, got, want)
