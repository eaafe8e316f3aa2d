"""PostgresStore against the real PostgreSQL: when a write lets the analysis stage run."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
import trio

from sentiment import rows as rows_module
from sentiment import store as store_module
from sentiment.analysis.noop import NoopAnalyzer
from sentiment.post import Post
from sentiment.rows import Record
from sentiment.store import SENDING_WAIT_S, PostgresStore

from ..support.servers import rows


def records(n: int) -> list[Record]:
    result = NoopAnalyzer()._result
    when = datetime(2026, 1, 1, tzinfo=UTC)
    return [Record(Post(f"1-{i}", f"p{i}", f"text {i}", "", "", when), result) for i in range(n)]


class HeldWrite:
    """`write_rows` in two steps the test opens: formatting the rows, then the statements after them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.formatted, self.executed = (threading.Event() for _ in range(3))
        real = rows_module.write_rows

        def held(conn: Any, rows: Any, *, on_sent: Callable[[], None] | None = None, **kw: Any) -> Any:
            assert on_sent is not None
            self.entered.set()
            self.formatted.wait(10)

            def sent() -> None:
                on_sent()
                self.executed.wait(10)  # the server still busy with the statements

            return real(conn, rows, on_sent=sent, **kw)

        monkeypatch.setattr(store_module, "write_rows", held)

    async def started(self) -> None:
        """The write's thread is in `write_rows`."""
        with trio.fail_after(5):
            while not self.entered.is_set():  # noqa: ASYNC110 - set by a thread
                await trio.sleep(0.001)


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(pg_dsn)
    await store.migrate()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldWrite]:
    held = HeldWrite(monkeypatch)
    try:
        yield held
    finally:  # before the store closes (fixtures end in reverse order): its thread must finish
        held.formatted.set()
        held.executed.set()


async def test_rows_sent_waits_while_a_write_formats_its_rows_and_no_longer(
    pg_dsn: str, store: PostgresStore, held: HeldWrite
) -> None:
    returned = trio.Event()

    async def wait() -> None:
        await store.rows_sent()
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write, records(3))
        await held.started()
        nursery.start_soon(wait)
        await trio.sleep(SENDING_WAIT_S / 4)
        assert not returned.is_set()  # still formatting
        held.formatted.set()
        with trio.fail_after(5):
            await returned.wait()
        assert rows(pg_dsn) == 0  # the statements have not run: the wait ended at the send
        held.executed.set()
    assert rows(pg_dsn) == 3
    with trio.fail_after(5):
        await store.rows_sent()  # no write under way: at once


async def test_rows_sent_is_bounded_when_a_write_never_sends(
    pg_dsn: str, store: PostgresStore, held: HeldWrite
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write, records(2))
        await held.started()
        started = trio.current_time()
        await store.rows_sent()
        waited = trio.current_time() - started
        assert SENDING_WAIT_S * 0.9 <= waited < SENDING_WAIT_S + 2
        held.formatted.set()
        held.executed.set()
    assert rows(pg_dsn) == 2


async def test_a_replacement_with_other_content_replaces_nothing(pg_dsn: str, store: PostgresStore) -> None:
    # reanalyze reads its posts from the table, so their content matches; a row that did not must not
    # take the post's current analysis away and put nothing in its place.
    first, second = records(2)
    await store.write([first, second])
    other = Record(attrs.evolve(first.post, content="other content"), first.analysis)
    assert await store.replace([other, second]) == 1
    assert rows(pg_dsn) == 2  # both posts keep a current analysis
    assert rows(pg_dsn, "SELECT count(*) FROM sentiment_analysis_history") == 1
    assert rows(pg_dsn, "SELECT count(*) FROM sentiment_analysis_history WHERE post_id = 'p1'") == 1
