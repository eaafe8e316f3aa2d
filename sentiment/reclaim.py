"""Recover stale pending entries left by dead consumers (scripts/reclaim.py).

Walks XAUTOCLAIM from 0-0, following the cursor until it returns to 0-0, and sends what it claims through
the worker's own analyse → write → ack path."""

from __future__ import annotations

from typing import TextIO

import attrs
import trio

from .processing import Processor
from .retry import retrying
from .stream import PendingEntry


@attrs.define
class ReclaimReport:
    claimed: int = 0
    processed: int = 0
    dead_lettered: int = 0
    deleted: int = 0

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


async def reclaim(processor: Processor, min_idle_ms: int) -> ReclaimReport:
    report = ReclaimReport()
    stream, redis = processor.stream, processor.redis
    await processor.prepare()
    cursor = "0-0"
    while True:
        claimed = await retrying(redis, stream.autoclaim, cursor, min_idle_ms, processor.settings.batch_size)
        if claimed.deleted:
            await retrying(redis, stream.ack, list(claimed.deleted))
            report.deleted += len(claimed.deleted)
        if claimed.entries:
            report.claimed += len(claimed.entries)
            analysed = await processor.analyse(claimed.entries)
            with trio.CancelScope(
                shield=True
            ):  # a claimed batch is written and acked whole, or stays pending
                outcome = await processor.commit(analysed)
            report.processed += outcome.written
            report.dead_lettered += outcome.dead_lettered
        cursor = claimed.cursor
        if cursor in ("0-0", "0"):
            return report


async def list_stale(
    processor: Processor, min_idle_ms: int, out: TextIO, limit: int = 10_000
) -> list[PendingEntry]:
    """--dry-run: the entries reclaim would take (XPENDING extended form), claiming nothing."""
    stream = processor.stream
    await retrying(processor.redis, stream.ensure_group)
    stale = await retrying(processor.redis, stream.pending, limit, None, min_idle_ms)
    print(f"{'id':<24} {'owner':<32} {'idle_ms':>12} {'deliveries':>10}", file=out)
    for p in stale:
        print(f"{p.id:<24} {p.consumer:<32} {p.idle_ms:>12} {p.deliveries:>10}", file=out)
    return stale
