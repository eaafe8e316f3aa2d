"""A real Redis Cluster (three masters, three replicas, from the installed redis-server) under sharded
streams: the end-to-end drain, reclaim after a SIGKILLed worker, a master SIGKILLed mid-run, a graceful
failover under idle workers, a resharded slot (test_cluster_client.py: the node the client started from)."""

from __future__ import annotations

import json
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import psycopg
import pytest
import redis
import redis.cluster

from sentiment.config import Settings
from sentiment.keys import ShardKeys, shard_of
from sentiment.produce import publish
from sentiment.synthetic import synthetic_posts
from sentiment.tools.throwaway import ThrowawayCluster, make_workdir

from ..support.llm_server import Reply, llm_server
from ..support.servers import (
    ROOT,
    blocked_reads,
    drain,
    llm_env,
    rows,
    rows_so_far,
    run_cli,
    start_worker,
    wait_for,
    worker_env,
)

SHARDS = 3


@contextmanager
def throwaway_cluster() -> Iterator[ThrowawayCluster]:
    """Three masters and three replicas; a replica takes over a killed master in a second or two."""
    workdir = make_workdir("sentiment-cluster-")
    c = ThrowawayCluster(workdir, node_timeout_ms=1000)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayCluster]:
    with throwaway_cluster() as c:
        yield c


@pytest.fixture
def crs(cluster: ThrowawayCluster) -> Iterator[redis.cluster.RedisCluster]:
    client = redis.cluster.RedisCluster.from_url(cluster.url)
    yield client
    client.close()


@pytest.fixture
def on_cluster(settings: Settings, cluster: ThrowawayCluster) -> Settings:
    # A stream name of its own, without the conftest's `test:` prefix cleanup (the cluster goes away).
    return attrs.evolve(
        settings,
        redis_url=cluster.url,
        stream=f"posts-{uuid.uuid4().hex[:8]}",
        claim_min_idle_ms=1000,
        reclaim_interval_ms=200,
        stream_shards=SHARDS,
    )


def shards(s: Settings) -> tuple[ShardKeys, ...]:
    return s.keys(cluster=True)


def published(s: Settings, n: int, seed: int) -> tuple[ShardKeys, ...]:
    """`n` synthetic posts spread over the shards as `produce` spreads them; the shards' keys."""
    keys = shards(s)
    publish(s.redis_url, [k.stream for k in keys], synthetic_posts(n, seed=seed), progress=False)
    return keys


def owed(client: redis.cluster.RedisCluster, s: Settings) -> list[int]:
    """Each shard's pending count (0 before the group exists)."""
    counts = []
    for k in shards(s):
        try:
            counts.append(int(client.xpending(k.stream, s.group)["pending"]))
        except redis.ResponseError:  # NOGROUP: no worker has started yet
            counts.append(0)
    return counts


def pending(client: redis.cluster.RedisCluster, s: Settings) -> int:
    return sum(owed(client, s))


def test_shard_keys_share_a_slot_and_spread_over_the_masters(
    on_cluster: Settings, cluster: ThrowawayCluster, crs: redis.cluster.RedisCluster
) -> None:
    keys = shards(on_cluster)
    for k in keys:
        assert len({crs.keyslot(k.stream), crs.keyslot(k.dead), crs.keyslot(k.attempts)}) == 1
    assert len({cluster.master_of(k.stream).port for k in keys}) == SHARDS


def test_drain_over_shards(on_cluster: Settings, crs: redis.cluster.RedisCluster) -> None:
    n = 900
    keys = published(on_cluster, n, seed=3)
    lengths = [crs.xlen(k.stream) for k in keys]
    assert sum(lengths) == n and all(length > 200 for length in lengths), lengths
    bad = keys[shard_of("bad", SHARDS)]
    crs.xadd(bad.stream, {"post_id": "bad"})  # no content: dead-lettered beside its own shard
    drain(on_cluster)
    assert rows(on_cluster.database_url) == n
    assert pending(crs, on_cluster) == 0
    assert [crs.xlen(k.dead) for k in keys] == [int(k is bad) for k in keys]
    env = worker_env(on_cluster)
    stats = run_cli(["-m", "sentiment", "stats", "--json"], env)
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert [s["stream"] for s in figures["shards"]] == [k.stream for k in keys]
    assert figures["tables"]["sentiment_analysis"] == n
    listed = run_cli(["-m", "sentiment", "deadletter", "list"], env)
    assert listed.returncode == 0 and "missing" in listed.stdout and listed.stdout.count("\n") == 1


def test_reclaim_after_a_sigkilled_worker(on_cluster: Settings, crs: redis.cluster.RedisCluster) -> None:
    keys = shards(on_cluster)
    n = 600
    publish(on_cluster.redis_url, [k.stream for k in keys], synthetic_posts(n, seed=4), progress=False)
    env = worker_env(on_cluster, CONSUMER_NAME="doomed")
    assert run_cli(["-m", "sentiment", "migrate"], env).returncode == 0
    locker = psycopg.connect(on_cluster.database_url)
    locker.execute("LOCK TABLE sentiment_analysis IN ACCESS EXCLUSIVE MODE")  # every write waits
    proc = start_worker(env)
    try:
        wait_for(lambda: all(owed(crs, on_cluster)), "entries pending in every shard")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        locker.rollback()
        locker.close()
    left = pending(crs, on_cluster)
    assert rows(on_cluster.database_url) == 0 and left > 0
    done = run_cli([str(ROOT / "scripts" / "reclaim.py"), "--min-idle-ms", "0"], worker_env(on_cluster))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report == {"claimed": left, "processed": left, "dead_lettered": 0, "deleted": 0}
    assert pending(crs, on_cluster) == 0
    drain(on_cluster)
    assert rows(on_cluster.database_url) == n
    assert rows(on_cluster.database_url, "SELECT count(DISTINCT post_id) FROM sentiment_analysis") == n


def waiting_on(cluster: ThrowawayCluster, key: str) -> int:
    """Connections waiting in XREADGROUP on the master serving `key`."""
    with redis.Redis(port=cluster.master_of(key).port) as master:
        return len(blocked_reads(master))


def test_idle_workers_read_on_through_a_graceful_failover(
    on_cluster: Settings, cluster: ThrowawayCluster, crs: redis.cluster.RedisCluster
) -> None:
    # A graceful failover (an operator's upgrade: CLUSTER FAILOVER on the replica) ends every blocked
    # XREADGROUP on the old master with "UNBLOCKED ... (master -> replica?)". In review every idle worker
    # exited 1 at that moment; they must follow the slot to the new master instead.
    n = 600
    keys = shards(on_cluster)
    env = worker_env(on_cluster, BLOCK_MS="10000")
    workers = [start_worker(env), start_worker(env)]
    try:
        wait_for(lambda: waiting_on(cluster, keys[0].stream) == 2, "both workers waiting on shard 0", 60)
        failover_s = cluster.fail_over(keys[0].stream)
        published(on_cluster, n, seed=8)

        def exited() -> bool:
            return any(w.poll() is not None for w in workers)

        wait_for(lambda: exited() or rows_so_far(on_cluster.database_url) == n, "every post", 120)
        wait_for(lambda: exited() or pending(crs, on_cluster) == 0, "nothing pending", 60)
        assert not exited(), "a worker exited"
    finally:
        logs = []
        for w in workers:
            w.send_signal(signal.SIGTERM)
            logs.append(w.communicate(timeout=60)[1])
        if any(w.returncode for w in workers):
            print(*(log[-3000:] for log in logs), sep="\n---- worker log ----\n")
    print(f"\ngraceful failover: the replica served after {failover_s:.1f} s")
    assert [w.returncode for w in workers] == [0, 0]
    assert all("Traceback" not in log for log in logs)
    assert rows(on_cluster.database_url, "SELECT count(DISTINCT post_id) FROM sentiment_analysis") == n
    assert [crs.xlen(k.dead) for k in keys] == [0, 0, 0]


def stopped_duplicates(log: str) -> int:
    """The duplicates a worker reported in its last line (`stopped: written W, duplicates D, …`)."""
    line = next(x for x in reversed(log.splitlines()) if "stopped: written" in x)
    return int(line.split("duplicates ")[1].split(",")[0])


def test_a_master_killed_mid_run_loses_no_post_and_writes_none_twice(
    on_cluster: Settings, cluster: ThrowawayCluster, crs: redis.cluster.RedisCluster
) -> None:
    n = 3000
    keys = published(on_cluster, n, seed=5)
    # The posts are on the replicas before the kill: the worker's own writes (deliveries, acks, dead
    # letters) are what the failover may lose here (docs/reliability.md says what a producer's may).
    cluster.wait_replicated()
    with llm_server() as (url, script):
        # A slow model (0.1 s a request) keeps the run going while the master dies.
        script.replies.extend(Reply(delay=0.1) for _ in range(100_000))
        env = worker_env(on_cluster, **llm_env(url))
        workers = [start_worker(env), start_worker(env)]
        codes: list[int | None] = []
        try:
            wait_for(lambda: rows_so_far(on_cluster.database_url) >= n // 4, "a quarter of the posts", 120)
            failover_s = cluster.kill_master_of(keys[0].stream)
            at_kill = rows(on_cluster.database_url)
            assert at_kill < n, "the run ended before the kill"
            wait_for(lambda: rows(on_cluster.database_url) == n, "every post", 120)
            wait_for(lambda: pending(crs, on_cluster) == 0, "nothing pending", 60)
            assert all(w.poll() is None for w in workers), "a worker exited"
        finally:
            logs = []
            for w in workers:
                w.send_signal(signal.SIGTERM)
                logs.append(w.communicate(timeout=60)[1])
            codes = [w.returncode for w in workers]
            if codes != [0, 0]:
                print(*(log[-4000:] for log in logs), sep="\n---- worker log ----\n")
        # A new process starts from a live node (REDIS_URL's may be the one killed).
        final = drain(attrs.evolve(on_cluster, redis_url=cluster.url), **llm_env(url))
    duplicates = sum(stopped_duplicates(log) for log in logs) + stopped_duplicates(final.stderr)
    analysed = rows(on_cluster.database_url)
    distinct = rows(on_cluster.database_url, "SELECT count(DISTINCT post_id) FROM sentiment_analysis")
    left = pending(crs, on_cluster)
    print(
        f"\nfailover: posts {n}, masters killed 1 (replica serving after {failover_s:.1f} s, rows at the "
        f"kill {at_kill}), rows {analysed}, distinct posts {distinct}, duplicates absorbed {duplicates}, "
        f"pending {left}, worker exit codes {codes}"
    )
    assert analysed == distinct == n and left == 0 and codes == [0, 0]
    assert all("Traceback" not in log for log in logs)
    # Each shard says when its Redis calls start failing and when they work again: a few times at most
    # (a replica taking over, the other masters refusing until it has, nodes whose slot maps catch up
    # one by one), not the many times a second of one flag shared by shards whose calls kept working.
    for log in logs:
        outages = [x.split("WARNING")[-1] for x in log.splitlines() if "Redis" in x and "unavailable" in x]
        assert all(sum(f"({k.stream})" in x for x in outages) <= 3 for k in keys), outages


def test_a_shard_resharded_mid_run_is_followed(
    on_cluster: Settings, cluster: ThrowawayCluster, crs: redis.cluster.RedisCluster
) -> None:
    # Shard 0's slot moves to another master key by key while a worker drains (between the first and
    # the last MIGRATE its keys answer ASK), then back (MOVED): redirections are followed, not errors.
    n = 2000
    keys = published(on_cluster, n, seed=7)
    for i in range(5):
        crs.xadd(keys[0].stream, {"post_id": f"bad-{i}"})  # no content: dead-lettered beside shard 0
    slot = str(crs.keyslot(keys[0].stream))

    def move(to_port: int) -> None:
        source = cluster.master_of(keys[0].stream).port
        ids = {p: cluster.cli(p, "cluster", "myid").strip() for p in (source, to_port)}

        def setslot(port: int, *how: str) -> None:
            reply = cluster.cli(port, "cluster", "setslot", slot, *how).strip()
            assert reply == "OK", f"CLUSTER SETSLOT {slot} {' '.join(how)} on {port}: {reply}"

        setslot(to_port, "importing", ids[source])
        setslot(source, "migrating", ids[to_port])

        def migrate(key: str) -> None:
            moved = cluster.cli(source, "migrate", "127.0.0.1", str(to_port), key, "0", "30000").strip()
            assert moved in ("OK", "NOKEY"), f"MIGRATE {key}: {moved}"

        for key in (keys[0].stream, keys[0].dead, keys[0].attempts):
            migrate(key)
            time.sleep(0.5)
        # Then whatever else the slot holds, as `redis-cli --cluster reshard` empties it: the earlier
        # tests' streams share shard 0's hash tag. A source still holding a key refuses SETSLOT NODE
        # and stays MIGRATING (its ASK and the new owner's MOVED then send clients round in a loop).
        while left := cluster.cli(source, "cluster", "getkeysinslot", slot, "100").split():
            for key in left:
                migrate(key)
        # The new owner first (it bumps its epoch), then the old (it stops redirecting with ASK), then the
        # other masters, as the Redis Cluster specification orders it.
        others = [p for p, r in cluster.roles().items() if r == "master" and p not in ids]
        for port in (to_port, source, *others):
            setslot(port, "node", ids[to_port])

    with llm_server() as (url, script):
        script.replies.extend(Reply(delay=0.05) for _ in range(100_000))  # a run long enough to move under
        worker = start_worker(worker_env(on_cluster, **llm_env(url), BATCH_SIZE="20"))
        try:
            wait_for(lambda: rows_so_far(on_cluster.database_url) >= n // 5, "a fifth of the posts", 120)
            home = cluster.master_of(keys[0].stream).port
            away = next(p for p, r in cluster.roles().items() if r == "master" and p != home)
            move(away)
            assert cluster.master_of(keys[0].stream).port == away
            move(home)
            assert rows(on_cluster.database_url) < n, "the run ended before the slot came back"
            wait_for(lambda: rows(on_cluster.database_url) == n, "every post", 120)
            wait_for(lambda: pending(crs, on_cluster) == 0, "nothing pending", 120)
            assert worker.poll() is None, "the worker exited"
        finally:
            worker.send_signal(signal.SIGTERM)
            log = worker.communicate(timeout=60)[1]
            print("pending by shard:", [crs.xpending(k.stream, on_cluster.group)["pending"] for k in keys])
            print("\n".join(x for x in log.splitlines() if "dead-lettered entry" not in x)[-6000:])
    assert worker.returncode == 0 and "Traceback" not in log, log[-3000:]
    assert rows(on_cluster.database_url, "SELECT count(DISTINCT post_id) FROM sentiment_analysis") == n
    assert [crs.xlen(k.dead) for k in keys] == [5, 0, 0]
