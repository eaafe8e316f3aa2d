"""Pending entries: how many to take at once, claiming idle ones (XAUTOCLAIM), and the reclaim command.

The worker's reclaimer and `python -m sentiment reclaim` (scripts/reclaim.py) walk the pending list with
the same `claimed_pages`, and send what they claim through the processor's analyse → write → ack path."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from functools import partial
from typing import TextIO

import attrs
import trio

from .entries import Claimed, Entry, PendingEntry, Stream, next_id
from .parts import Parts
from .processor import Processor
from .retry import Health, retrying


@attrs.frozen
class Page:
    """How many pending entries to take at once, or the next one measured in Redis as too large to read
    (then taken without its body, and dead-lettered from the copy of its first bytes)."""

    size: int
    oversized: Entry | None = None


async def next_page(
    parts: Parts, start: str, *, own: bool, idle_ms: int | None, batch_size: int, max_deliveries: int
) -> Page:
    """`batch_size`, or 1 when the next page holds an entry delivered more than `max_deliveries` times.
    Reading a batch of huge entries may be what killed the workers before (memory); one at a time, each
    is read, bounded and dead-lettered on its own. Such an entry next in line is first measured where it
    lies: one too large even alone is never read."""
    ahead = await retrying(
        parts.redis, partial(parts.stream.pending, batch_size, own=own, idle_ms=idle_ms, start=start)
    )
    if not any(p.deliveries > max_deliveries for p in ahead):
        return Page(batch_size)
    if ahead[0].deliveries > max_deliveries:
        big = await retrying(parts.redis, parts.stream.peek_oversized, ahead[0].id)
        if big is not None:
            return Page(1, attrs.evolve(big, deliveries=ahead[0].deliveries))
    return Page(1)


async def claimed_pages(
    stream: Stream, redis: Health, min_idle_ms: int, size: Callable[[str], Awaitable[Page]]
) -> AsyncGenerator[Claimed, None]:
    """One pass of XAUTOCLAIM over the group's pending list, from 0-0 until the cursor comes back: each
    page of entries idle for `min_idle_ms` or more, now ours. `size(start)` says how many to take from
    `start`. Pending IDs whose entry was deleted (XDEL, trimming) cannot be processed: they are acked here
    and reported in the page."""
    cursor = "0-0"
    while True:
        page = await size("-" if cursor == "0-0" else cursor)
        if page.oversized is not None:
            # Claimed without its body (JUSTID); the page holds the copy Redis cut, if it is now ours.
            big = page.oversized
            ids = await retrying(redis, stream.claim, [big.id], min_idle_ms)
            # After the largest ID there is nothing left: 0-0 ends the pass, as XAUTOCLAIM's own does.
            claimed = Claimed(next_id(big.id) or "0-0", (big,) if ids == [big.id] else (), ())
        else:
            claimed = await retrying(redis, stream.autoclaim, cursor, min_idle_ms, page.size)
        if claimed.deleted:
            await retrying(redis, stream.ack, list(claimed.deleted))
        yield claimed
        cursor = claimed.cursor
        if cursor in ("0-0", "0"):
            return


@attrs.define
class ReclaimReport:
    claimed: int = 0
    processed: int = 0
    dead_lettered: int = 0
    deleted: int = 0

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)

    def add(self, other: ReclaimReport) -> None:
        """Count another shard's report in."""
        for field in attrs.fields(ReclaimReport):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


async def reclaim(
    parts: Parts,
    processor: Processor,
    min_idle_ms: int,
    *,
    batch_size: int,
    max_deliveries: int,
) -> ReclaimReport:
    """Claim every entry idle for `min_idle_ms` or more, one page at a time, and process it."""
    report = ReclaimReport()
    await processor.prepare()

    async def size(start: str) -> Page:
        return await next_page(
            parts, start, own=False, idle_ms=min_idle_ms, batch_size=batch_size, max_deliveries=max_deliveries
        )

    async with aclosing(claimed_pages(parts.stream, parts.redis, min_idle_ms, size)) as pages:
        async for claimed in pages:
            report.deleted += len(claimed.deleted)
            if not claimed.entries:
                continue
            report.claimed += len(claimed.entries)
            analysed = await processor.analyse(claimed.entries)
            with trio.CancelScope(shield=True):  # written and acked whole, or left pending
                outcome = await processor.commit(analysed)
            report.processed += outcome.written
            report.dead_lettered += outcome.dead_lettered
    return report


async def list_stale(parts: Parts, min_idle_ms: int, out: TextIO, limit: int = 10_000) -> list[PendingEntry]:
    """--dry-run: the entries reclaim would take (XPENDING extended form), claiming nothing."""
    await retrying(parts.redis, parts.stream.ensure_group)
    stale = await retrying(parts.redis, partial(parts.stream.pending, limit, idle_ms=min_idle_ms))
    print(f"{'id':<24} {'owner':<32} {'idle_ms':>12} {'deliveries':>10}", file=out)
    for p in stale:
        print(f"{p.id:<24} {p.consumer:<32} {p.idle_ms:>12} {p.deliveries:>10}", file=out)
    return stale
