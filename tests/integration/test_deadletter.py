"""Dead-letter integrity on the real Redis, with real worker processes: no entry is ever acked without a
dead-letter copy (a key of the wrong type, a failing XADD, a connection cut at the dead-letter write), the
operator's replay, and one current analysis per post."""

from __future__ import annotations

import json
import uuid

import attrs
import psycopg
import redis

from sentiment.config import Settings
from sentiment.tools.throwaway import free_port

from ..support.llm_server import llm_server
from ..support.proxy import Cutter, cutting_proxy
from ..support.servers import (
    dead_letters,
    drain,
    llm_env,
    readyz_text,
    rows,
    rows_so_far,
    run_cli,
    start_worker,
    wait_for,
    worker_env,
)

INVALID = {"post_id": "bad", "content": "x", "created_at": "not a date"}


def test_a_dead_letter_key_that_is_no_stream_is_refused_at_start(
    settings: Settings, rds: redis.Redis
) -> None:
    rds.set(settings.dead_letter, "a string")
    rds.xadd(settings.stream, INVALID)
    result = run_cli(["-m", "sentiment", "run", "--drain"], worker_env(settings))
    assert result.returncode == 2
    [line] = [x for x in result.stderr.splitlines() if x.startswith("sentiment:")]
    assert "DEAD_LETTER_STREAM" in line and "holds a string" in line
    assert rds.xinfo_groups(settings.stream) == []  # refused before any group or read

    same = run_cli(["-m", "sentiment", "run"], worker_env(settings, DEAD_LETTER_STREAM=settings.stream))
    assert same.returncode == 2 and "DEAD_LETTER_STREAM must differ" in same.stderr


def test_a_failing_dead_letter_xadd_never_acks(settings: Settings, rds: redis.Redis) -> None:
    port = free_port()
    proc = start_worker(worker_env(settings, METRICS_PORT=str(port)))
    try:
        rds.xadd(settings.stream, {"post_id": "first", "content": "up and running"})
        wait_for(lambda: rows_so_far(settings.database_url) == 1, "the first row")
        rds.set(settings.dead_letter, "someone overwrote the key")  # every XADD to it now fails
        pipe = rds.pipeline(transaction=True)  # one batch: its row commits, its dead letters cannot
        for i in range(3):
            pipe.xadd(settings.stream, INVALID | {"post_id": f"bad{i}"})
        pipe.xadd(settings.stream, {"post_id": "good", "content": "still written"})
        bad = [i.decode() for i in pipe.execute()[:3]]
        wait_for(lambda: rows(settings.database_url) == 2, "the good row")
        # Once a retry fails too (one failure may be a blip) the worker says why on /readyz. A retry
        # waits up to a second of jitter: a fixed sleep here could let the repair below come first.
        wait_for(lambda: "cannot add to DEAD_LETTER_STREAM" in readyz_text(port), "the failure on /readyz")
        pending = {
            p["message_id"].decode()
            for p in rds.xpending_range(settings.stream, settings.group, "-", "+", 10)
        }
        assert pending == set(bad), "an entry whose dead-letter copy failed was acked"
        assert proc.poll() is None, "the worker must ride it out"
        rds.delete(settings.dead_letter)  # fixed: the copies go through and only then the acks
        wait_for(lambda: rds.xpending(settings.stream, settings.group)["pending"] == 0, "the acks")
        assert set(dead_letters(rds, settings.dead_letter)) == set(bad)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "cannot add to DEAD_LETTER_STREAM" in err


def test_a_connection_cut_at_the_dead_letter_write_leaves_one_copy(
    settings: Settings, rds: redis.Redis
) -> None:
    bad = [rds.xadd(settings.stream, INVALID | {"post_id": f"bad{i}"}).decode() for i in range(5)]
    key = settings.dead_letter.encode()
    cutter = Cutter(trigger=b"XADD\r\n$%d\r\n%s\r\n" % (len(key), key))
    with cutting_proxy(6379, cutter) as port:
        proxied = Settings(
            database_url=settings.database_url,
            redis_url=f"redis://127.0.0.1:{port}/0",
            stream=settings.stream,
            model_type="noop",
        )
        drain(proxied, BATCH_SIZE="10")
    assert cutter.cuts == 1  # the XADD ran, its reply was lost, the worker retried
    assert set(dead_letters(rds, settings.dead_letter)) == set(bad)  # one copy each
    assert rds.xpending(settings.stream, settings.group)["pending"] == 0


def test_a_worker_killed_between_the_dead_letter_copy_and_its_ack_leaves_one_copy(
    settings: Settings, rds: redis.Redis
) -> None:
    # A Redis user that may do everything but XACK stands for a worker that dies (SIGKILL, OOM, the
    # grace period's end) after its dead-letter XADD and before the XACK: the next worker must find
    # the copies, not add them again.
    user = f"noack_{uuid.uuid4().hex[:8]}"
    rds.acl_setuser(user, enabled=True, nopass=True, categories=["+@all"], commands=["-xack"], keys=["*"])
    try:
        bad = [rds.xadd(settings.stream, INVALID | {"post_id": f"bad{i}"}).decode() for i in range(3)]
        no_ack = attrs.evolve(settings, redis_url=f"redis://{user}@127.0.0.1:6379/0")
        proc = start_worker(worker_env(no_ack, CONSUMER_NAME="dies"))
        try:
            wait_for(lambda: rds.xlen(settings.dead_letter) == 3, "the dead-letter copies")
            assert rds.xpending(settings.stream, settings.group)["pending"] == 3
        finally:
            proc.kill()
            proc.communicate(timeout=30)
    finally:
        rds.acl_deluser(user)
    drain(settings, CONSUMER_NAME="dies")  # its own pending entries, read again after the restart
    assert set(dead_letters(rds, settings.dead_letter)) == set(bad)  # one copy each
    assert rds.xpending(settings.stream, settings.group)["pending"] == 0
    assert rds.hlen(f"{settings.stream}:attempts:{settings.group}") == 0  # nothing left behind


def test_replay_after_the_cause_is_fixed_writes_each_post_once(settings: Settings, rds: redis.Redis) -> None:
    with llm_server() as (url, script):
        llm = attrs.evolve(settings, model_type="llm")
        env = llm_env(url, MAX_DELIVERIES="2", CLAIM_MIN_IDLE_MS="200", RECLAIM_INTERVAL_MS="100")
        for i in range(9):
            rds.xadd(settings.stream, {"post_id": f"r{i}", "content": f"refused text {i}"})
        # A valid post over DEAD_LETTER_MAX_BYTES (65536) and under MAX_CONTENT_BYTES: copied whole.
        rds.xadd(settings.stream, {"post_id": "r9", "content": "refused text 9 " + "long " * 14_000})
        # The provider refuses these texts as such (HTTP 400), and answers others (the probe): each
        # refusal is an attempt of the text.
        script.reject_text = "refused text"
        drain(llm, **env)
        dead = dead_letters(rds, settings.dead_letter)
        assert len(dead) == 10 and all("analysis failed 2 times" in d.reason for d in dead.values())
        assert not [d for d in dead.values() if d.truncated]
        assert rows(settings.database_url) == 0

        script.reject_text = None  # fixed
        listing = run_cli(["-m", "sentiment", "deadletter", "list", "--json"], worker_env(llm, **env))
        assert len(listing.stdout.splitlines()) == 10
        dry = run_cli(["-m", "sentiment", "deadletter", "replay", "--dry-run"], worker_env(llm, **env))
        assert json.loads(dry.stdout)["replayed"] == 10 and rds.xlen(settings.dead_letter) == 10
        replay = run_cli(["-m", "sentiment", "deadletter", "replay"], worker_env(llm, **env))
        assert json.loads(replay.stdout)["replayed"] == 10, replay.stderr
        assert rds.xlen(settings.dead_letter) == 0
        drain(llm, **env)
        assert rows(settings.database_url) == 10
        # A replay whose XDEL never happened (a crash between the two) is replayed again: no new rows.
        for d in dead.values():
            rds.xadd(
                settings.dead_letter,
                {b"layout": b"2", b"reason": d.reason.encode(), b"stream": settings.stream.encode()}
                | {b"f:" + k: v for k, v in d.original.items()},
            )
        run_cli(["-m", "sentiment", "deadletter", "replay"], worker_env(llm, **env))
        drain(llm, **env)
    assert rows(settings.database_url) == 10
    assert rows(settings.database_url, "SELECT count(DISTINCT post_id) FROM sentiment_analysis") == 10
    assert rds.xlen(settings.dead_letter) == 0
    assert rds.xpending(settings.stream, settings.group)["pending"] == 0


def test_purge_removes_letters_before_an_id(settings: Settings, rds: redis.Redis) -> None:
    for i in range(4):
        rds.xadd(settings.stream, INVALID | {"post_id": f"bad{i}"})
    drain(settings)
    ids = [i.decode() for i, _ in rds.xrange(settings.dead_letter)]
    result = run_cli(["-m", "sentiment", "deadletter", "purge", "--before", ids[2]], worker_env(settings))
    assert json.loads(result.stdout) == {"purged": 2}
    assert [i.decode() for i, _ in rds.xrange(settings.dead_letter)] == ids[2:]


def test_one_post_one_current_analysis(settings: Settings, rds: redis.Redis) -> None:
    rds.xadd(settings.stream, {"post_id": "p1", "content": "first version"})
    drain(settings)
    with llm_server() as (url, _script):
        # A redelivery analysed by another model (the LLM fallback, an upgrade) adds no second row.
        rds.xadd(settings.stream, {"post_id": "p1", "content": "first version"})
        rds.xadd(settings.stream, {"post_id": "p3", "content": "new"})
        drain(settings, **llm_env(url))
    # A post_id reused with other content, against the stored post and within one batch: each entry
    # of a post_id meets what the ones before it stored, as if it came in a batch of its own.
    other_p1 = [rds.xadd(settings.stream, {"post_id": "p1", "content": "other text"}) for _ in range(2)]
    rds.xadd(settings.stream, {"post_id": "p2", "content": "a"})
    rds.xadd(settings.stream, {"post_id": "p2", "content": "a"})
    other_p2 = rds.xadd(settings.stream, {"post_id": "p2", "content": "b"})
    other_p3 = rds.xadd(settings.stream, {"post_id": "p3", "content": "edited"})
    rds.xadd(settings.stream, {"post_id": "p3", "content": "new"})  # the stored content: a duplicate
    drain(settings)
    with psycopg.connect(settings.database_url) as conn:
        current = dict(conn.execute("SELECT post_id, model FROM sentiment_analysis").fetchall())
        [content] = conn.execute(
            "SELECT content FROM social_media_posts WHERE post_id = 'p1'"
        ).fetchone() or [None]
    assert current == {"p1": "noop", "p2": "noop", "p3": "llm:openai:gpt-4o-mini"}
    assert content == "first version"
    reasons = {i: d.reason for i, d in dead_letters(rds, settings.dead_letter).items()}
    assert reasons == {
        **{i.decode(): "post_id 'p1' is already stored with other content" for i in other_p1},
        other_p2.decode(): "post_id 'p2' is already stored with other content",
        other_p3.decode(): "post_id 'p3' is already stored with other content",
    }
    assert rds.xpending(settings.stream, settings.group)["pending"] == 0

    # Moving posts to another model is an explicit operation; the replaced row is kept in the history.
    again = run_cli(["-m", "sentiment", "reanalyze"], worker_env(settings))
    assert json.loads(again.stdout) == {"model": "noop", "reanalysed": 1, "dry_run": False, "failed": 0}, (
        again.stderr
    )
    assert rows(settings.database_url, "SELECT count(*) FROM sentiment_analysis WHERE model = 'noop'") == 3
    assert rows(settings.database_url, "SELECT count(*) FROM sentiment_analysis_history") == 1


def test_migration_keeps_every_row_and_leaves_one_current(pg_dsn: str) -> None:
    """A database from before (several rows per post, one per model) moves to one current analysis."""
    from importlib import resources

    initial = resources.files("sentiment.migrations").joinpath("001_initial.sql").read_text()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(initial)
        conn.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("INSERT INTO schema_version (version, name) VALUES (1, '001_initial.sql')")
        conn.execute("INSERT INTO social_media_posts (post_id, content, created_at) VALUES ('a', 'x', now())")
        for model, age in (("old", "2 days"), ("new", "1 day")):
            conn.execute(
                "INSERT INTO sentiment_analysis (post_id, sentiment, sentiment_score, emotion, emotion_score,"
                " scores, model, analyzed_at, stream_entry_id) VALUES ('a', 'positive', 0.9, 'joy', 0.8,"
                f" '{{}}', %s, now() - interval '{age}', '1-0')",
                (model,),
            )
    result = run_cli(["-m", "sentiment", "migrate"], worker_env(Settings(database_url=pg_dsn)))
    assert result.returncode == 0, result.stderr
    assert rows(pg_dsn, "SELECT count(*) FROM sentiment_analysis WHERE model = 'new'") == 1
    assert rows(pg_dsn, "SELECT count(*) FROM sentiment_analysis") == 1
    assert rows(pg_dsn, "SELECT count(*) FROM sentiment_analysis_history WHERE model = 'old'") == 1
