"""The store: posts and analyses in PostgreSQL, written a batch per transaction, idempotently.

psycopg has no trio support, and both ways open were measured (docs/benchmarks.md, "Design
measurements"): a sync connection driven from a worker thread, and psycopg's AsyncConnection through
trio-asyncio, writing the same batches, ran at the same speed within noise. We keep the thread: a batch is one hop whose
cancellation waits for the thread, so a commit is never cut mid-COPY, and it does not depend on import
order (psycopg's async code binds asyncio.get_running_loop at import, before trio-asyncio patches it
unless trio_asyncio is imported first, and then fails with "no running event loop").

What a batch's write sends, and each post's row: rows.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from importlib import resources
from typing import Any, Protocol

import attrs
import psycopg
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConfigError, StoreError, StoreFailure, StoreUnavailable
from .post import Post
from .redact import driver_text, mask_url
from .rows import Record, WriteResult, prepare_connection, write_rows

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x5E171E  # pg_advisory_xact_lock key: one migrator at a time across workers
CLOSE_TIMEOUT_S = 2.0
# Bound on `rows_sent`: formatting a batch's rows takes about a millisecond; a send that blocks (a server
# that stopped reading) must not hold the analysis stage.
SENDING_WAIT_S = 0.1
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


@attrs.frozen
class TableCounts:
    posts: int
    analyses: int
    last_analyzed_at: datetime | None


class Store(Protocol):
    async def migrate(self) -> int: ...
    async def check_writable(self) -> None: ...
    async def write(self, records: Sequence[Record]) -> WriteResult: ...
    async def rows_sent(self) -> None: ...
    async def ping(self) -> bool: ...


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


def _set_event() -> trio.Event:
    event = trio.Event()
    event.set()
    return event


class PostgresStore:
    """One connection, used by one thread at a time (a CapacityLimiter of 1); reconnects after a failure."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._has_temp = False
        self._limiter = trio.CapacityLimiter(1)
        self._sending = _set_event()  # set while no write is formatting its rows (`rows_sent`)

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
        sending = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def post(fn: Callable[[], None]) -> None:  # from the writing thread to trio's, in order
            with contextlib.suppress(trio.RunFinishedError):  # a write abandoned at shutdown
                token.run_sync_soon(fn)

        def arm() -> None:
            self._sending = sending

        # Armed here, before the analysis task runs again, when the connection is free; a write queued
        # behind another shard's formats nothing yet, and is armed from its thread once it starts.
        armed = self._limiter.available_tokens > 0
        if armed:
            arm()

        def write(conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]]) -> WriteResult:
            if not armed:
                post(arm)
            return self._write(conn, rows, False, partial(post, sending.set))

        try:
            result: WriteResult = await self._run(write, [r.row for r in records])
        finally:
            sending.set()
        return result

    async def rows_sent(self) -> None:
        """Return once the write under way, if any, has sent its rows (at most SENDING_WAIT_S).

        Up to then its thread formats rows and needs the GIL; after that the server works and the GIL
        is free. The analysis stage waits here before its own Python work on a batch: started together,
        that work held the writer's thread back for the GIL's switch interval (5 ms) each batch, and the
        writer is the slowest stage when the model is fast (docs/benchmarks.md)."""
        with trio.move_on_after(SENDING_WAIT_S):
            await self._sending.wait()

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
        self,
        conn: psycopg.Connection[Any],
        rows: list[tuple[Any, ...]],
        replace: bool,
        on_sent: Callable[[], None] | None = None,
    ) -> WriteResult:
        if not self._has_temp:
            prepare_connection(conn)
            self._has_temp = True
        return write_rows(conn, rows, replace=replace, on_sent=on_sent)

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
