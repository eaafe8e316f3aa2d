"""Anything a producer can put in a stream, through a real `python -m sentiment run --drain` process on the
real Redis and PostgreSQL: the process exits 0, valid posts are rows, every other entry is in the
dead-letter stream with its reason and its original fields, nothing is pending."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import attrs
import psycopg
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentiment.config import Settings
from sentiment.errors import InvalidPost
from sentiment.post import Limits, Post

from ..support.servers import PG_URL, REDIS_URL, dead_letters, run_cli, worker_env

MB = 1_000_000
DEAD_MAX = 65_536


@attrs.frozen
class Case:
    fields: dict[bytes, bytes]
    expect: str  # "row", "dead", or "either" (decided by the parser: must then be exactly one)


def _data(obj: object) -> dict[bytes, bytes]:
    return {b"data": json.dumps(obj).encode()}


# Now and then a post_id shared with other entries of the run: the same post again, or another text.
_ids = st.one_of(st.uuids().map(lambda u: f"v-{u.hex}"), st.sampled_from(["v-shared-1", "v-shared-2"]))
_text = st.text(min_size=1, max_size=200).filter(lambda t: t.strip("\x00").strip() != "")

valid = st.one_of(
    st.builds(lambda i, t: Case(_data({"post_id": i, "content": t}), "row"), _ids, _text),
    st.builds(
        lambda i, t: Case({b"post_id": i.encode(), b"content": t.encode()}, "row"),
        _ids,
        _text.filter(lambda t: "\x00" not in t),
    ),
    # Our dead-letter field names in a valid post are just data.
    st.builds(
        lambda i, t: Case(
            {b"post_id": i.encode(), b"content": t.encode(), b"dead_reason": b"mine", b"reason": b"x"},
            "row",
        ),
        _ids,
        _text.filter(lambda t: "\x00" not in t),
    ),
)

_field = st.sampled_from(["content", "post_id", "author", "source"])
hostile = st.one_of(
    # Lone surrogates, spelled as JSON escapes, in any text field.
    st.builds(
        lambda i, f: Case(
            {b"data": json.dumps({"post_id": i, "content": "ok"} | {f: "bad \ud800 text"}).encode()},
            "dead",
        ),
        _ids,
        _field,
    ),
    st.builds(
        lambda n: Case({b"data": b'{"post_id": ' + b"7" * n + b', "content": "x"}'}, "dead"),
        st.integers(4301, 6000),
    ),
    st.builds(lambda n: Case({b"data": b"[" * n + b"]" * n}, "dead"), st.integers(5_000, 200_000)),
    st.builds(lambda i: Case({b"post_id": i.encode(), b"content": b"x" * (10 * MB)}, "dead"), _ids),
    st.builds(
        lambda n: Case({f"f{k}".encode(): b"v" for k in range(n)} | {b"content": b"x"}, "dead"),
        st.integers(65, 3000),
    ),
    # An invalid post carrying our own dead-letter field names: they must survive as its data.
    st.builds(
        lambda i: Case(
            {
                b"post_id": i.encode(),
                b"content": b"x",
                b"created_at": b"not a date",
                b"dead_reason": b"producer's own",
                b"reason": b"also theirs",
                b"f:content": b"and this",
            },
            "dead",
        ),
        _ids,
    ),
    st.builds(lambda i: Case({b"post_id": i.encode(), b"content": b"\xff\xfe bad utf-8"}, "dead"), _ids),
    st.builds(lambda i: Case({b"post_id": f"{i}\x00".encode(), b"content": b"nul in id"}, "dead"), _ids),
    st.builds(lambda t: Case({b"data": t.encode()}, "dead"), st.text(max_size=50).map(lambda t: "[" + t)),
    # Anything at all: raw bytes in names and values, arbitrary JSON.
    st.builds(
        lambda d: Case(d, "either"),
        st.dictionaries(st.binary(min_size=1, max_size=12), st.binary(max_size=60), min_size=1, max_size=6),
    ),
    st.builds(
        lambda obj: Case({b"data": json.dumps(obj).encode()}, "either"),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
            max_leaves=10,
        ),
    ),
)


@contextmanager
def fresh_schema() -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def parses(fields: dict[bytes, bytes]) -> bool:
    try:
        Post.from_fields("1-0", fields, Limits())
    except InvalidPost:
        return False
    return True


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(st.lists(st.one_of(valid, hostile), min_size=20, max_size=50), st.lists(valid, min_size=5))
def test_a_real_worker_survives_any_entry(cases: list[Case], more_valid: list[Case]) -> None:
    cases = cases + more_valid
    stream = f"test:{uuid.uuid4().hex[:12]}"
    r = redis.Redis.from_url(REDIS_URL)
    try:
        with fresh_schema() as dsn:
            published = {r.xadd(stream, c.fields).decode(): c for c in cases}  # type: ignore[arg-type]
            s = Settings(database_url=dsn, redis_url=REDIS_URL, stream=stream, model_type="noop")
            result = run_cli(
                ["-m", "sentiment", "run", "--drain"], worker_env(s, BATCH_SIZE="16"), timeout=300
            )
            assert result.returncode == 0, result.stderr[-3000:]
            assert "Traceback" not in result.stderr
            with psycopg.connect(dsn) as conn:
                stored = dict(
                    conn.execute(
                        "SELECT p.post_id, p.content FROM sentiment_analysis JOIN social_media_posts p "
                        "USING (post_id)"
                    ).fetchall()
                )
            dead = dead_letters(r, s.dead_letter)
            assert r.xpending(stream, s.group)["pending"] == 0
            first: dict[str, str] = {}  # post_id → the content of its first valid entry, in stream order
            for entry_id, case in published.items():
                expect = (
                    case.expect if case.expect != "either" else ("row" if parses(case.fields) else "dead")
                )
                if expect == "row":
                    post = Post.from_fields(entry_id, case.fields, Limits())
                    if first.setdefault(post.post_id, post.content) == post.content:
                        assert stored.get(post.post_id) == post.content, case  # written, or a duplicate
                        assert entry_id not in dead, dead.get(entry_id)
                    else:  # the post_id again with another text: never silently dropped
                        letter = dead[entry_id]
                        assert (
                            letter.reason == f"post_id {post.post_id!r} is already stored with other content"
                        )
                        assert letter.original == case.fields and not letter.truncated
                    continue
                letter = dead[entry_id]
                assert letter.reason.startswith("invalid post: "), letter.reason
                assert letter.stream == stream and letter.deliveries == 1
                if sum(len(k) + len(v) for k, v in case.fields.items()) <= DEAD_MAX:
                    assert letter.original == case.fields and not letter.truncated
                else:
                    assert "this copy keeps" in letter.truncated
                    assert sum(len(k) + len(v) for k, v in letter.original.items()) <= DEAD_MAX
                    assert all(case.fields[k].startswith(v) for k, v in letter.original.items())
    finally:
        r.delete(stream, f"{stream}:dead", f"{stream}:attempts:sentiment_workers")
        r.close()


def test_a_flood_of_huge_entries_does_not_double_redis_memory(settings: Settings, rds: redis.Redis) -> None:
    huge = 2 * MB
    for i in range(20):
        rds.xadd(settings.stream, {"post_id": f"h{i}", "content": b"x" * huge})
    result = run_cli(["-m", "sentiment", "run", "--drain"], worker_env(settings))
    assert result.returncode == 0, result.stderr[-3000:]
    dead = dead_letters(rds, settings.dead_letter)
    assert len(dead) == 20
    assert all("over the limit of 1000000" in d.reason and d.truncated for d in dead.values())
    copies = int(rds.memory_usage(settings.dead_letter, samples=0) or 0)
    originals = int(rds.memory_usage(settings.stream, samples=0) or 0)
    assert originals > 40 * MB and copies < originals / 20, (copies, originals)


def test_large_valid_entries_are_read_and_handed_on_within_the_byte_budget(
    settings: Settings, rds: redis.Redis
) -> None:
    """40 valid posts of about 900 KB each (a padding field): the first read takes BATCH_SIZE of them and
    hands them on in batches of at most 8 MB; every later read takes only what fits in 8 MB (8)."""
    pad = b"x" * 900_000
    for i in range(40):
        rds.xadd(settings.stream, {"post_id": f"L{i}", "content": f"large post {i}", "padding": pad})
    counts: list[int] = []
    done = threading.Event()

    def watch() -> None:  # the COUNT of every XREADGROUP of new entries on this stream
        with redis.Redis.from_url(REDIS_URL).monitor() as m:
            while not done.is_set():
                command = m.next_command()["command"]
                if command.startswith("XREADGROUP") and command.endswith(f"{settings.stream} >"):
                    counts.append(int(re.search(r"COUNT (\d+)", command).group(1)))  # type: ignore[union-attr]

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_cli(["-m", "sentiment", "run", "--drain"], worker_env(settings, BATCH_SIZE="256"))
    finally:
        done.set()
        rds.ping()  # a command for the monitor to wake on
        watcher.join(timeout=10)
    assert result.returncode == 0, result.stderr[-3000:]
    assert counts[0] == 256 and counts[1:] and set(counts[1:]) == {8}, counts
    with psycopg.connect(settings.database_url) as conn:
        stored = conn.execute("SELECT count(*), count(DISTINCT post_id) FROM sentiment_analysis").fetchone()
    assert stored == (40, 40)
    assert rds.xpending(settings.stream, settings.group)["pending"] == 0
