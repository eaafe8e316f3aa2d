"""The store: posts and analyses in PostgreSQL, written a batch per transaction, idempotently.

psycopg has no trio support, and both ways open were measured (docs/benchmarks.md, "Design
measurements"): a sync connection driven from a worker thread, and psycopg's AsyncConnection through
trio-asyncio, writing the same batches, ran at the same speed within noise. We keep the thread: a batch is one hop whose
cancellation waits for the thread, so a commit is never cut mid-COPY, and it does not depend on import
order (psycopg's async code binds asyncio.get_running_loop at import, before trio-asyncio patches it
unless trio_asyncio is imported first, and then fails with "no running event loop").

Bulk path: COPY into a temporary table, then INSERT … SELECT … ON CONFLICT DO NOTHING into both tables.
COPY streams the batch in one message; the conflict clause makes a redelivered entry a no-op.

One post, one current analysis: `sentiment_analysis` is unique on post_id. A redelivered post changes
nothing, whichever model analysed it this time. A post_id that comes back with other content is not
written; its entry ID is returned as a conflict, and the caller dead-letters it with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from importlib import resources
from typing import Any, Protocol

import attrs
import psycopg
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .analysis.base import EMOTION_VALUES, SENTIMENT_VALUES, Analysis, top_label
from .analysis.labels import EMOTIONS, SENTIMENTS
from .errors import ConfigError, StoreError, StoreFailure, StoreUnavailable
from .post import Post
from .redact import driver_text, mask_url

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x5E171E  # pg_advisory_xact_lock key: one migrator at a time across workers
CLOSE_TIMEOUT_S = 2.0
# Every wait on PostgreSQL is bounded where it happens, since the thread that waits cannot be cancelled:
# on the server (a statement, a lock, a transaction left open) and on the socket (keepalives notice a
# dead peer; tcp_user_timeout, unacknowledged data). A user's own `options` in DATABASE_URL come after
# ours and win.
_SERVER_TIMEOUTS = {
    "statement_timeout": "30s",
    "lock_timeout": "10s",
    "idle_in_transaction_session_timeout": "60s",
}
_SOCKET = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 20_000,
}


def bounded(dsn: str) -> str:
    """The DSN with the server-side timeouts and socket bounds above."""
    ours = " ".join(f"-c {k}={v}" for k, v in _SERVER_TIMEOUTS.items())
    theirs = conninfo_to_dict(dsn).get("options") or ""
    return make_conninfo(dsn, options=f"{ours} {theirs}".strip(), **_SOCKET)


# The scores column, written out rather than json.dumps'd (a tenth of a no-op worker's main-thread time
# went to that): Analysis admits only our label names as keys and finite floats as values, and a float's
# repr is what json writes for it. One format string for the whole object: the values are read by label
# (`SENTIMENT_VALUES`, an operator.itemgetter, in C) and formatted in one call, 40% faster than a join per
# distribution.
_SCORES = (
    '{"sentiment": {'
    + ", ".join(f'"{label}": %r' for label in SENTIMENTS)
    + '}, "emotion": {'
    + ", ".join(f'"{label}": %r' for label in EMOTIONS)
    + "}}"
)


def _encode(post: Post, analysis: Analysis) -> tuple[Any, ...]:
    """The COPY row of one post and its analysis. The probabilities are read once, in label order, for
    the labels (as Analysis chooses them) and the scores column."""
    s, e = SENTIMENT_VALUES(analysis.sentiment_scores), EMOTION_VALUES(analysis.emotion_scores)
    return (
        post.post_id,
        post.source,
        post.content,
        post.author,
        post.created_at,
        top_label(s, SENTIMENTS),
        max(s),
        top_label(e, EMOTIONS),
        max(e),
        _SCORES % (*map(float, s), *map(float, e)),
        analysis.model,
        post.entry_id,
    )


@attrs.frozen
class Record:
    """A post and its analysis, encoded as a COPY row once, where it is made: in the analysis stage,
    off the writer's critical path (docs/benchmarks.md)."""

    post: Post
    analysis: Analysis
    row: tuple[Any, ...] = attrs.field(
        init=False, default=attrs.Factory(lambda self: _encode(self.post, self.analysis), takes_self=True)
    )


@attrs.frozen
class WriteResult:
    posts_inserted: int
    analyses_inserted: int
    # Entry IDs whose post_id is already stored with other content: nothing of theirs was written.
    conflicts: tuple[str, ...] = ()


@attrs.frozen
class TableCounts:
    posts: int
    analyses: int
    last_analyzed_at: datetime | None


class Store(Protocol):
    async def migrate(self) -> int: ...
    async def check_writable(self) -> None: ...
    async def write(self, records: Sequence[Record]) -> WriteResult: ...
    async def ping(self) -> bool: ...


COLUMNS = (
    "post_id",
    "source",
    "content",
    "author",
    "created_at",
    "sentiment",
    "sentiment_score",
    "emotion",
    "emotion_score",
    "scores",
    "model",
    "stream_entry_id",
)
_TEMP_TABLE = """
CREATE TEMP TABLE incoming (
    post_id text, source text, content text, author text, created_at timestamptz,
    sentiment text, sentiment_score real, emotion text, emotion_score real, scores text,
    model text, stream_entry_id text
) ON COMMIT DELETE ROWS
"""
_INSERT_POSTS = """
INSERT INTO social_media_posts (post_id, source, content, author, created_at)
SELECT post_id, source, content, author, created_at FROM incoming
ON CONFLICT (post_id) DO NOTHING
"""
_CONFLICTS = """
SELECT i.stream_entry_id FROM incoming i JOIN social_media_posts p USING (post_id)
WHERE p.content IS DISTINCT FROM i.content
"""
_INSERT_ANALYSES = """
INSERT INTO sentiment_analysis
    (post_id, sentiment, sentiment_score, emotion, emotion_score, scores, model, stream_entry_id)
SELECT i.post_id, i.sentiment, i.sentiment_score, i.emotion, i.emotion_score, i.scores::jsonb, i.model,
       i.stream_entry_id
FROM incoming i JOIN social_media_posts p ON p.post_id = i.post_id AND p.content = i.content
ON CONFLICT (post_id) DO NOTHING
"""
# `sentiment reanalyze`: the replaced analysis moves to the history table, the new one becomes current.
_MOVE_TO_HISTORY = """
INSERT INTO sentiment_analysis_history
    (id, post_id, sentiment, sentiment_score, emotion, emotion_score, scores, model, analyzed_at,
     stream_entry_id)
SELECT a.id, a.post_id, a.sentiment, a.sentiment_score, a.emotion, a.emotion_score, a.scores, a.model,
       a.analyzed_at, a.stream_entry_id
FROM sentiment_analysis a JOIN incoming i USING (post_id)
"""
_DELETE_REPLACED = "DELETE FROM sentiment_analysis a USING incoming i WHERE a.post_id = i.post_id"
_ANALYSED_BY_OTHERS = """
SELECT p.post_id, p.source, p.content, p.author, p.created_at, a.stream_entry_id
FROM sentiment_analysis a JOIN social_media_posts p USING (post_id)
WHERE a.model <> %(current)s AND (%(only)s::text IS NULL OR a.model = %(only)s) AND a.post_id > %(after)s
ORDER BY a.post_id
LIMIT %(limit)s
"""
# What the worker's write needs (README, "Storage"): the JOINs and the conflict query read both tables.
_NEEDED = (
    *(
        (f"has_table_privilege('{table}', '{privilege}')", f"{privilege} on {table}")
        for table in ("social_media_posts", "sentiment_analysis")
        for privilege in ("INSERT", "SELECT")
    ),
    (
        "has_sequence_privilege(pg_get_serial_sequence('sentiment_analysis', 'id'), 'USAGE')",
        "USAGE on the sequence of sentiment_analysis.id",
    ),
    ("has_database_privilege(current_database(), 'TEMPORARY')", "TEMPORARY on the database"),
)
_WRITABLE = f"SELECT {', '.join(check for check, _ in _NEEDED)}, current_user"


def prepare_connection(conn: psycopg.Connection[Any]) -> None:
    """Create the session's staging table for `write_rows`, outside any batch transaction, so that a
    rollback cannot drop it."""
    conn.execute(_TEMP_TABLE)


def write_rows(
    conn: psycopg.Connection[Any],
    rows: Sequence[tuple[Any, ...]],
    *,
    replace: bool = False,
    find_conflicts: bool = True,
) -> WriteResult:
    """Write `Record.row`s in one transaction: COPY into the staging table, then the posts and their
    analyses with INSERT … ON CONFLICT DO NOTHING, so a redelivered batch writes nothing twice. A post_id
    already stored with other content is reported in `conflicts` and not written. `replace`: the new
    analyses become the current ones and the replaced ones move to the history table (reanalyze).
    `find_conflicts=False` skips that check: only the raw-loop benchmark does, whose floor has always been
    COPY and the two INSERTs alone. Used by PostgresStore and that benchmark."""
    with conn.transaction(), conn.cursor() as cur:
        try:
            with cur.copy(f"COPY incoming ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.Error:
            raise
        except Exception as exc:
            # A value psycopg cannot encode (say, a lone surrogate that slipped past validation) is the
            # data's fault like a row the server refuses: the caller isolates it row by row.
            raise StoreError(f"a row cannot be encoded: {type(exc).__name__}: {exc}"[:300]) from exc
        cur.execute(_INSERT_POSTS)
        posts = cur.rowcount
        if replace:
            cur.execute(_MOVE_TO_HISTORY)
            cur.execute(_DELETE_REPLACED)
        conflicts = tuple(r[0] for r in cur.execute(_CONFLICTS).fetchall()) if find_conflicts else ()
        cur.execute(_INSERT_ANALYSES)
        return WriteResult(posts, cur.rowcount, conflicts)


class PostgresStore:
    """One connection, used by one thread at a time (a CapacityLimiter of 1); reconnects after a failure."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._has_temp = False
        self._limiter = trio.CapacityLimiter(1)

    async def aclose(self) -> None:
        # Bounded: a statement abandoned at shutdown may still hold the connection (and the limiter);
        # the process exits without waiting for it, and the server ends the session.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
            await trio.to_thread.run_sync(self._close, limiter=self._limiter, abandon_on_cancel=True)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = _connect_or_create(self.dsn)
            self._has_temp = False
        return self._conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        # A thread cannot be cancelled; abandoning it on cancel lets shutdown keep its bound. That is
        # safe: nothing is acked before a write returns, and a write that commits after all is absorbed
        # by ON CONFLICT when the entries are redelivered. The limiter stays held until the thread ends,
        # so the connection is never used by two threads.
        return await trio.to_thread.run_sync(
            self._guarded, fn, *args, limiter=self._limiter, abandon_on_cancel=True
        )

    def _guarded(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(self._connect(), *args)
        except psycopg.OperationalError as exc:
            # The connection broke (server gone, cut at commit): the transaction's fate is unknown, so the
            # caller retries the whole batch and ON CONFLICT absorbs it if it had committed.
            self._close()
            raise StoreUnavailable(self._said(exc)) from exc
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            raise StoreError(f"PostgreSQL refused the data: {driver_text(exc, self.dsn)}") from exc
        except psycopg.errors.InsufficientPrivilege as exc:
            raise StoreFailure(
                f"{self._said(exc)} (GRANT the role in DATABASE_URL the privileges the worker needs, "
                "see README)"
            ) from exc
        except psycopg.Error as exc:
            raise StoreFailure(self._said(exc)) from exc

    def _said(self, exc: BaseException) -> str:
        """What PostgreSQL said, as one line without secrets, and which server said it."""
        return f"PostgreSQL at {mask_url(self.dsn)}: {driver_text(exc, self.dsn)}"

    async def ping(self) -> bool:
        await self._run(lambda conn: conn.execute("SELECT 1"))
        return True

    async def migrate(self) -> int:
        """Apply the numbered SQL files not yet recorded in schema_version; returns the schema version."""
        return int(await self._run(_migrate))

    async def check_writable(self) -> None:
        """StoreFailure unless the worker's writes can succeed: tables present, INSERT and TEMPORARY
        granted. The worker reads no entry before this passes, so a missing grant blames no post."""

        def check(conn: psycopg.Connection[Any]) -> None:
            row = conn.execute(_WRITABLE).fetchone()
            assert row is not None
            missing = [what for ok, (_, what) in zip(row[:-1], _NEEDED, strict=True) if not ok]
            if missing:
                raise StoreFailure(
                    f"PostgreSQL role {row[-1]} lacks {', '.join(missing)}: the worker waits (readyz 503) "
                    "until it is granted"
                )

        await self._run(check)

    async def write(self, records: Sequence[Record]) -> WriteResult:
        if not records:
            return WriteResult(0, 0)
        result: WriteResult = await self._run(self._write, [r.row for r in records], False)
        return result

    async def analysed_by_others(self, current: str, only: str | None, after: str, limit: int) -> list[Post]:
        """Posts whose current analysis another model made (only `only`, if given), by post_id."""

        def query(conn: psycopg.Connection[Any]) -> list[Post]:
            params = {"current": current, "only": only, "after": after, "limit": limit}
            return [
                Post(entry_id=r[5], post_id=r[0], source=r[1], content=r[2], author=r[3], created_at=r[4])
                for r in conn.execute(_ANALYSED_BY_OTHERS, params).fetchall()
            ]

        posts: list[Post] = await self._run(query)
        return posts

    async def replace(self, records: Sequence[Record]) -> int:
        """Make these analyses the current ones; the ones they replace move to the history table."""
        if not records:
            return 0
        result: WriteResult = await self._run(self._write, [r.row for r in records], True)
        return result.analyses_inserted

    def _write(
        self, conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]], replace: bool
    ) -> WriteResult:
        if not self._has_temp:
            prepare_connection(conn)
            self._has_temp = True
        return write_rows(conn, rows, replace=replace)

    async def counts(self) -> TableCounts:
        def query(conn: psycopg.Connection[Any]) -> TableCounts:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM social_media_posts), count(*), max(analyzed_at)"
                " FROM sentiment_analysis"
            ).fetchone()
            assert row is not None
            return TableCounts(int(row[0]), int(row[1]), row[2])

        result: TableCounts = await self._run(query)
        return result


def _connect_or_create(dsn: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(bounded(dsn), autocommit=True)
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc) or "database" not in str(exc):
            raise
    dbname = conninfo_to_dict(dsn).get("dbname") or "postgres"
    log.warning("database %s does not exist: creating it", dbname)
    try:
        with psycopg.connect(bounded(make_conninfo(dsn, dbname="postgres")), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(dbname))))
    except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
        pass  # another worker created it first (a race PostgreSQL reports as either)
    except psycopg.errors.InsufficientPrivilege:
        raise ConfigError(
            f"database {dbname} does not exist and the role in DATABASE_URL may not create it: "
            f"run `createdb {dbname}` as a superuser"
        ) from None
    return psycopg.connect(bounded(dsn), autocommit=True)


def _schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The applied schema version, or None when there is no schema_version table yet."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    version = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(version[0]) if version and version[0] is not None else None


def _migrate(conn: psycopg.Connection[Any]) -> int:
    files = sorted(
        (f for f in resources.files("sentiment.migrations").iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    latest = max(int(f.name.split("_", 1)[0]) for f in files)
    current = _schema_version(conn)
    if current is not None and current >= latest:
        # Nothing to do, and nothing tried: a worker whose role may only read and write rows (the schema
        # migrated by an administrator) must not fail on DDL it does not need.
        return current
    with conn.transaction():
        conn.execute("SET LOCAL statement_timeout = 0")  # a migration of a large table may take long
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_version")}
        for f in files:
            version = int(f.name.split("_", 1)[0])
            if version in done:
                continue
            conn.execute(f.read_text(encoding="utf-8"))
            conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, f.name))
            log.info("applied migration %s", f.name)
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0
