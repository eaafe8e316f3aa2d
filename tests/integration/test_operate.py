"""Operating the worker: metrics, health probes, stats and produce, against the real servers."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import httpx
import psycopg
import redis
import trio

from sentiment.config import Settings
from sentiment.entries import MAX_ID_PART as MAX
from sentiment.group_state import CHECK_UP_TO
from sentiment.monitor import serve_monitor
from sentiment.tools.throwaway import ThrowawayRedis, free_port, make_workdir
from sentiment.wiring import build_worker, open_parts, open_stream

from ..support.fakes import FakeAnalyzer
from ..support.servers import (
    readyz,
    readyz_text,
    rows,
    rows_so_far,
    run_cli,
    start_worker,
    wait_for,
    worker_env,
)


class LazyAnalyzer(FakeAnalyzer):
    """Loads only when told to, like the real model on its first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded = False
        self.may_load = trio.Event()

    async def load(self) -> None:
        await self.may_load.wait()
        self.loaded = True

    async def analyze(self, texts: list[str]) -> list:  # type: ignore[override]
        await self.load()
        return await super().analyze(texts)


async def get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


def counter(text: str, name: str, outcome: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_metrics_move_and_readiness_follows_the_model(settings: Settings, rds: redis.Redis) -> None:
    analyzer = LazyAnalyzer()
    async with open_parts(settings, analyzer) as parts:
        worker = build_worker(settings, parts)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_monitor, worker, parts, 0)
                for i in range(7):
                    rds.xadd(settings.stream, {"post_id": f"m{i}", "content": "nice"})
                rds.xadd(settings.stream, {"content": "no id"})
                nursery.start_soon(worker.run)
                while not (await get(port, "/readyz")).text.startswith("not ready: starting"):  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert (await get(port, "/readyz")).status_code == 503
                assert (await get(port, "/healthz")).status_code == 200
                before = (await get(port, "/metrics")).text
                assert counter(before, "sentiment_posts_total", "written") == 0
                await trio.sleep(0.5)
                # A worker that cannot analyse yet reads nothing: no delivery is spent on it.
                assert rds.xinfo_groups(settings.stream)[0]["entries-read"] is None
                analyzer.may_load.set()
                while rows(settings.database_url) < 7:  # noqa: ASYNC110 - polling PostgreSQL
                    await trio.sleep(0.05)
                await trio.sleep(0.2)
                assert (await get(port, "/readyz")).status_code == 200
                after = (await get(port, "/metrics")).text
                assert counter(after, "sentiment_posts_total", "written") == 7
                assert counter(after, "sentiment_posts_total", "dead_lettered") == 1
                assert "sentiment_end_to_end_seconds_count 7.0" in after
                assert "sentiment_redis_up 1.0" in after and "sentiment_postgres_up 1.0" in after
                worker.stop()
                nursery.cancel_scope.cancel()


def test_produce_round_trips_a_file_and_stats_reports_it(settings: Settings, tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    jsonl = folder / "posts.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"post_id": f"j{i}", "content": f"text {i}", "author": "a"}) for i in range(5))
        + "\n"
    )
    csv_file = folder / "posts.csv"
    csv_file.write_text(
        'post_id,source,content,author,created_at\nc1,web,"hello, world",b,2024-01-01T00:00:00Z\n'
    )
    env = worker_env(settings)
    for f in (jsonl, csv_file):
        result = run_cli(["-m", "sentiment", "produce", str(f)], env)
        assert result.returncode == 0, result.stderr
    result = run_cli(["-m", "sentiment", "produce", "--count", "10", "--flat"], env)
    assert result.returncode == 0 and "published 10 posts" in result.stdout
    drained = run_cli(["-m", "sentiment", "run", "--drain"], env)
    assert drained.returncode == 0, drained.stderr
    stats = run_cli(["-m", "sentiment", "stats", "--json"], env)
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert figures["length"] == 16
    assert figures["tables"]["sentiment_analysis"] == 16 and figures["tables"]["social_media_posts"] == 16
    [group] = figures["groups"]
    assert group["pending"] == 0 and group["lag"] == 0
    assert figures["dead_letter"]["length"] == 0
    assert (
        rows(settings.database_url, "SELECT count(*) FROM social_media_posts WHERE content = 'hello, world'")
        == 1
    )
    text = run_cli(["-m", "sentiment", "stats"], env)
    assert "sentiment_analysis 16" in text.stdout


def metrics(port: int) -> dict[str, float]:
    """The worker's unlabelled gauges and counters, or nothing while it does not answer yet."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    except httpx.TransportError:
        return {}
    return {
        name: float(value)
        for name, value in (line.split() for line in text.splitlines() if not line.startswith("#"))
    }


def test_the_worker_counts_the_backlog_where_redis_cannot_tell_the_lag(
    settings: Settings, rds: redis.Redis
) -> None:
    # An XDEL ahead of the group's last-delivered ID: XINFO GROUPS's lag is null from then on (redis issue
    # 13337). Autoscaling on it would see nothing to do; the worker's own gauge counts the entries.
    ids = [rds.xadd(settings.stream, {"post_id": f"b{i}", "content": "hi"}) for i in range(2500)]
    rds.xdel(settings.stream, ids[1200])
    assert run_cli(["-m", "sentiment", "migrate"], worker_env(settings)).returncode == 0
    port = free_port()
    with psycopg.connect(settings.database_url) as lock:
        # The worker's writes wait on this lock: what it read stays pending, the rest undelivered.
        lock.execute("LOCK TABLE sentiment_analysis IN ACCESS EXCLUSIVE MODE")
        worker = start_worker(worker_env(settings, METRICS_PORT=str(port)))
        try:
            gauges: dict[str, float] = {}
            deadline = time.monotonic() + 60

            def consistent() -> bool:
                # One sample of the worker's: every live entry is either counted as not yet delivered or
                # pending (read, waiting on the lock), after the worker has read what it holds.
                backlog, pending = (
                    gauges.get(f"sentiment_{n}", 0) for n in ("backlog_entries", "pending_entries")
                )
                return pending > 0 and backlog + pending == 2499

            while not consistent() and time.monotonic() < deadline:
                time.sleep(0.5)
                gauges = metrics(port)
            assert consistent(), gauges
            assert gauges["sentiment_consumer_group_lag"] == -1
            assert rds.xinfo_groups(settings.stream)[0]["lag"] is None
        finally:
            worker.terminate()
            worker.communicate(timeout=30)


def test_a_lag_redis_reports_past_the_last_entry_is_no_backlog(settings: Settings, rds: redis.Redis) -> None:
    # After a graceful failover or a slot migration Redis 7.0 kept a lag of hundreds on groups that had
    # read everything (seen on a cluster in review). ENTRIESREAD 0 puts the group in that state here.
    for i in range(40):
        rds.xadd(settings.stream, {"post_id": f"l{i}", "content": "hi"})
    port = free_port()
    worker = start_worker(worker_env(settings, METRICS_PORT=str(port)))
    try:
        wait_for(lambda: rows_so_far(settings.database_url) == 40, "every post", 60)
        # A sample from before the reads said lag 40 too: wait for one that says 0.
        wait_for(lambda: metrics(port).get("sentiment_consumer_group_lag") == 0, "lag 0", 30)
        rds.xgroup_setid(settings.stream, settings.group, "$", entries_read=0)
        assert rds.xinfo_groups(settings.stream)[0]["lag"] == 40
        wait_for(lambda: metrics(port).get("sentiment_consumer_group_lag") == 40, "Redis's lag", 30)
        assert metrics(port)["sentiment_backlog_entries"] == 0
        # The group set to the largest ID there is: nothing can lie past it (no XRANGE from past it,
        # which Redis refuses; that ended the worker in review).
        rds.xgroup_setid(settings.stream, settings.group, f"{MAX}-{MAX}", entries_read=1)
        wait_for(lambda: metrics(port).get("sentiment_consumer_group_lag") == 39, "Redis's lag", 30)
        assert metrics(port)["sentiment_backlog_entries"] == 0
        time.sleep(1)
        assert worker.poll() is None, "the worker exited"
    finally:
        worker.terminate()
        log = worker.communicate(timeout=30)[1]
    assert worker.returncode == 0 and "Traceback" not in log, log[-3000:]


async def test_the_backlog_is_counted_where_redis_lag_is_wrong(settings: Settings, rds: redis.Redis) -> None:
    ids = [rds.xadd(settings.stream, {"n": str(i)}) for i in range(40)]
    rds.xgroup_create(settings.stream, settings.group, id="0")
    rds.xreadgroup(settings.group, "c", {settings.stream: ">"}, count=40)
    rds.xack(settings.stream, settings.group, *ids)
    async with open_stream(settings) as stream:
        # Lag 40 too high (as after a failover), then 5 real entries past the position: 5, not 45.
        rds.xgroup_setid(settings.stream, settings.group, "$", entries_read=0)
        for i in range(5):
            rds.xadd(settings.stream, {"n": f"new {i}"})
        assert await stream.group_info() == {"lag": 45, "backlog": 5, "pending": 0}
        # Lag 0 with entries waiting (ENTRIESREAD too high): counted.
        rds.xgroup_setid(settings.stream, settings.group, ids[-1], entries_read=45)
        assert await stream.group_info() == {"lag": 0, "backlog": 5, "pending": 0}
        # More past the position than are counted on every reading: Redis's lag stands (it may be that
        # wrong), or the count if higher.
        for i in range(CHECK_UP_TO):
            rds.xadd(settings.stream, {"n": f"more {i}"})
        # Redis says 256 and 261 wait: the lag is shown too low, so counted when asked, else unknown.
        assert await stream.group_info() == {"lag": CHECK_UP_TO, "backlog": -1, "pending": 0}
        assert (await stream.group_info(count_up_to=100_000))["backlog"] == CHECK_UP_TO + 5
        assert (await stream.group_info(count_up_to=1))["backlog"] == CHECK_UP_TO + 1  # "at least"
        rds.xgroup_setid(settings.stream, settings.group, ids[-1], entries_read=0)
        assert await stream.group_info() == {"lag": 301, "backlog": 301, "pending": 0}
        # Lag unknown (an XDEL past the position): counted up to what the caller asks.
        rds.xdel(settings.stream, rds.xrevrange(settings.stream, count=1)[0][0])
        assert await stream.group_info() == {"lag": -1, "backlog": -1, "pending": 0}
        assert (await stream.group_info(count_up_to=100_000))["backlog"] == 260
        assert (await stream.group_info(count_up_to=CHECK_UP_TO + 2))["backlog"] == CHECK_UP_TO + 2
        # The group at the largest ID there is: nothing past it.
        rds.xgroup_setid(settings.stream, settings.group, f"{MAX}-{MAX}")
        assert (await stream.group_info())["backlog"] == 0


async def test_without_eval_the_backlog_is_redis_lag(settings: Settings, rds: redis.Redis) -> None:
    # The count runs as a script (an undelivered entry may be too large to fetch); an ACL that denies
    # scripts leaves Redis's lag, as before, rather than no figure at all.
    user = f"noeval-{settings.stream.rsplit(':', 1)[-1]}"
    rds.acl_setuser(
        user, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-eval", "-evalsha"]
    )
    try:
        for i in range(3):
            rds.xadd(settings.stream, {"n": str(i)})
        rds.xgroup_create(settings.stream, settings.group, id="$", entries_read=0)  # lag 3, none waiting
        url = settings.redis_url.replace("redis://", f"redis://{user}:pw@")
        async with open_stream(attrs.evolve(settings, redis_url=url)) as stream:
            assert await stream.group_info(count_up_to=100) == {"lag": 3, "backlog": 3, "pending": 0}
        async with open_stream(settings) as stream:  # with scripts: counted
            assert await stream.group_info() == {"lag": 3, "backlog": 0, "pending": 0}
    finally:
        rds.acl_deluser(user)


def test_a_worker_says_when_work_waits_under_another_shard_count(
    settings: Settings, rds: redis.Redis
) -> None:
    # Produced under REDIS_STREAM_SHARDS=1, the worker started with 3: those posts are in a key it does
    # not read. It must say so rather than drain "nothing" in silence.
    for i in range(5):
        rds.xadd(settings.stream, {"post_id": f"old{i}", "content": "left behind"})
    try:
        result = run_cli(["-m", "sentiment", "run", "--drain"], worker_env(settings, REDIS_STREAM_SHARDS="3"))
        assert result.returncode == 0, result.stderr[-2000:]
        [line] = [x for x in result.stderr.splitlines() if "REDIS_STREAM_SHARDS=1" in x]
        assert settings.stream in line and "has not read" in line and "REDIS_STREAM_SHARDS=3" in line
        # Drained under the old setting, the key holds nothing unread: no warning.
        assert run_cli(["-m", "sentiment", "run", "--drain"], worker_env(settings)).returncode == 0
        again = run_cli(["-m", "sentiment", "run", "--drain"], worker_env(settings, REDIS_STREAM_SHARDS="3"))
        assert "REDIS_STREAM_SHARDS=1" not in again.stderr, again.stderr[-2000:]
    finally:
        for keys in attrs.evolve(settings, stream_shards=3).keys(cluster=False):
            rds.delete(keys.stream, keys.dead, keys.attempts)
    assert rows(settings.database_url) == 5


@contextmanager
def worker_before_redis(settings: Settings) -> Iterator[tuple[subprocess.Popen[str], ThrowawayRedis, int]]:
    """A worker process (REDIS_CLUSTER=auto, probes on the returned port) whose Redis is not started yet:
    it is up and answering its probes when this yields. Its server is stopped and its files removed after."""
    workdir = make_workdir("sentiment-late-redis-")
    server = ThrowawayRedis(workdir / "redis")  # not started: nothing answers on its port
    port = free_port()
    env = worker_env(
        attrs.evolve(settings, redis_url=server.url), METRICS_PORT=str(port), REDIS_CLUSTER="auto"
    )
    worker = start_worker(env)
    try:
        wait_for(lambda: readyz(port) is not None, "the probes", 60)
        yield worker, server, port
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate(timeout=30)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_worker_started_while_redis_is_down_answers_its_probes(settings: Settings) -> None:
    # REDIS_CLUSTER=auto asks Redis what it is before the parts exist. Until it answers, the probes say
    # "alive, not ready" and redis_up is 0: a pod without /healthz would be restarted in a loop by its
    # startup probe, and no alert would see why.
    with worker_before_redis(settings) as (worker, server, port):
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        answer = readyz(port)
        assert answer is not None and answer.status_code == 503 and "waiting for Redis" in answer.text
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "sentiment_redis_up 0.0" in metrics and "sentiment_ready 0.0" in metrics
        server.start()
        wait_for(lambda: readyz_text(port).startswith("ready"), "ready once Redis answers", 60)
        assert "sentiment_redis_up 1.0" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        worker.terminate()
        log = worker.communicate(timeout=30)[1]
    assert worker.returncode == 0 and "Traceback" not in log, log[-3000:]


def test_sigterm_while_the_worker_waits_for_redis_at_start_ends_it_at_once(settings: Settings) -> None:
    with worker_before_redis(settings) as (worker, _, _):
        worker.terminate()
        log = worker.communicate(timeout=15)[1]
    assert worker.returncode == 0, log[-3000:]
    assert "received SIGTERM" in log and "stopped during start-up: nothing was read" in log
