"""The worker: one nursery supervising reader, reclaimer, analysis and writer tasks, joined by
bounded channels.

    reader ─┐                      (capacity 1)              (capacity 1)
            ├─► batches ─► analysis (model in a thread) ─► analysed ─► writer: COMMIT, then XACK
    reclaim ┘

Back-pressure: channels hold one batch each, so a slow model or a PostgreSQL outage stops XREADGROUP.
An entry leaves the pending list only through the writer, after its rows are committed (or after it was
copied to the dead-letter stream). Whatever is in flight when the worker stops stays pending for reclaim.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import aclosing
from functools import partial

import attrs
import trio

from .entries import Entry, by_bytes, entry_size, id_key, read_count
from .errors import TransientError
from .parts import Parts
from .processor import Analysed, Outcome, Processor
from .reclaim import Page, claimed_pages, next_page
from .retry import retrying

log = logging.getLogger(__name__)


@attrs.frozen
class Batch:
    entries: tuple[Entry, ...]
    read_at_wall: float = attrs.field(factory=time.time)  # when it was read, for throughput figures


CommitHook = Callable[[Outcome, Analysed, Batch], None]


@attrs.frozen(kw_only=True)
class Options:
    """The settings the worker's own loops use (see config.py for each one's meaning)."""

    group: str
    batch_size: int
    block_ms: int
    claim_min_idle_ms: int
    reclaim_interval_ms: int
    max_deliveries: int
    shutdown_grace_s: float
    stuck_batch_s: float
    stream_retention_s: int
    consumer_remove_idle_ms: int = 0


@attrs.define
class Totals:
    """Counters since start, for the periodic summary line and the metrics."""

    read: int = 0
    written: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    retried: int = 0
    deleted: int = 0
    reclaimed: int = 0
    batches: int = 0

    @classmethod
    def sum(cls, totals: Iterable[Totals]) -> Totals:
        """The totals of several workers (one per shard) together."""
        out = cls()
        for t in totals:
            for field in attrs.fields(cls):
                setattr(out, field.name, getattr(out, field.name) + getattr(t, field.name))
        return out

    def add(self, outcome: Outcome) -> None:
        self.written += outcome.written
        self.duplicates += outcome.duplicates
        self.dead_lettered += outcome.dead_lettered
        self.retried += outcome.retried
        self.batches += 1


class Worker:
    """Run with `await worker.run(drain=...)`; `stop()` (signal handler) starts a graceful shutdown."""

    def __init__(self, parts: Parts, processor: Processor, options: Options) -> None:
        self.parts = parts
        self.processor = processor
        self.options = options
        self.totals = Totals()
        self.inflight: dict[str, None] = {}  # entry IDs read and not yet acked, dead-lettered or released
        self._read_size = options.batch_size  # entries the next read or claim takes (`_send`)
        self.last_progress = time.monotonic()  # last commit; wall clock, read by the /healthz thread
        self.on_commit: list[CommitHook] = []  # e.g. the metrics; called after each committed batch
        # Reader and reclaimer each run in one of these; cancelling both stops taking work.
        self._intake = (trio.CancelScope(), trio.CancelScope())
        self._commits: set[trio.CancelScope] = set()
        self._starting = trio.CancelScope()
        self.prepared = False  # start-up checks passed: from here on the worker reads entries
        # Set once the reader has re-read our own pending entries: until then the reclaimer must not
        # claim them (XAUTOCLAIM takes our own idle entries too), or they are analysed twice.
        self._own_pending_read = trio.Event()
        self._hard_stop = trio.CancelScope()
        self._deadline = math.inf  # set by stop(): when batches still in flight get cancelled
        self._committing: tuple[Batch, float] | None = None  # the batch in the writer, since when
        self._stuck_reported: Batch | None = None
        # In flight, but their leases were released while the writer was stuck: another worker may own
        # them now, and renewing (XCLAIM to us) would take them back. They are never renewed again.
        self._released: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def run(
        self, *, drain: bool = False, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with self._starting:  # stop() during start-up (say, Redis still down) ends it at once
            await self.processor.prepare()
        if self._starting.cancelled_caught:
            return
        self.prepared = True
        self.last_progress = time.monotonic()
        with self._hard_stop:
            async with trio.open_nursery() as nursery:
                batch_send, batch_recv = trio.open_memory_channel[Batch](1)
                done_send, done_recv = trio.open_memory_channel[tuple[Batch, Analysed]](1)
                background = trio.CancelScope()
                with batch_send:
                    await nursery.start(self._read, batch_send.clone(), drain)
                    nursery.start_soon(self._reclaim, batch_send.clone())
                nursery.start_soon(self._analyse, batch_recv, done_send)
                nursery.start_soon(self._write, done_recv, background)
                nursery.start_soon(self._background, background)
                task_status.started()

    @property
    def stopping(self) -> bool:
        return self._deadline < math.inf

    def stop(self) -> None:
        """Stop reading now; let batches in flight finish within SHUTDOWN_GRACE_S, then cancel the rest."""
        if self.stopping:
            return
        log.info("stopping: finishing batches in flight (grace %.0f s)", self.options.shutdown_grace_s)
        self._starting.cancel()
        self._stop_intake()
        self._deadline = trio.current_time() + self.options.shutdown_grace_s
        # Shielded commits ignore the outer deadline: give each its own, so the grace period binds them too.
        # A commit cut here leaves its entries pending (at worst written, not acked: redelivery is a no-op).
        for scope in (self._hard_stop, *self._commits):
            scope.deadline = self._deadline

    def _stop_intake(self) -> None:
        for scope in self._intake:
            scope.cancel()

    # -- stages ------------------------------------------------------------------------------------------

    async def _read(
        self,
        send: trio.MemorySendChannel[Batch],
        drain: bool,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        p, s = self.parts, self.options
        with send, self._intake[0]:
            task_status.started()
            # Our own pending entries first (a restart under the same CONSUMER_NAME), paging by ID.
            cursor = "0"
            while True:
                page = await self._next_page("-" if cursor == "0" else f"({cursor}", own=True, idle_ms=None)
                if page.oversized is not None:  # ours already: not read, dead-lettered from Redis's copy
                    cursor = page.oversized.id
                    await self._send(send, [page.oversized])
                    continue
                entries, deleted = await retrying(p.redis, p.stream.read, cursor, page.size, None)
                await self._ack_deleted(deleted)
                if not entries and not deleted:
                    break
                cursor = max([e.id for e in entries] + deleted, key=id_key)
                entries = await retrying(p.redis, p.stream.with_deliveries, entries)
                await self._send(send, entries)
            self._own_pending_read.set()
            # Then new ones. In drain mode a short block, and stop once the group owes nothing.
            block = min(s.block_ms, 200) if drain else s.block_ms
            while True:
                entries, _ = await retrying(p.redis, p.stream.read, ">", self._read_size, block)
                if entries:
                    await self._send(send, entries)
                elif drain and not self.inflight and await retrying(p.redis, p.stream.pending_count) == 0:
                    log.info("drained: nothing new or pending for group %s", s.group)
                    self._stop_intake()

    async def _reclaim(self, send: trio.MemorySendChannel[Batch]) -> None:
        """Every RECLAIM_INTERVAL_MS, take over entries idle over CLAIM_MIN_IDLE_MS (dead consumers')."""
        p, s = self.parts, self.options
        # XAUTOCLAIM may return our own in-flight entries (a slow read, a released lease); one
        # the writer finished while the claim was under way must not go round again: in flight
        # just before the claim, or just after it.
        busy: set[str] = set()

        async def size(start: str) -> Page:
            page = await self._next_page(start, own=False, idle_ms=s.claim_min_idle_ms)
            busy.clear()
            busy.update(self.inflight)
            return page

        removal_failing = False
        with send, self._intake[1]:
            await self._own_pending_read.wait()
            while True:
                if self.stuck():
                    # Our writer is stuck: take no more work, and above all do not re-claim our own
                    # stuck entries (XAUTOCLAIM would), which would keep them from other workers.
                    await trio.sleep(s.reclaim_interval_ms / 1000)
                    continue
                pages = claimed_pages(p.stream, p.redis, s.claim_min_idle_ms, size)
                async with aclosing(pages):
                    async for claimed in pages:
                        self._note_deleted(claimed.deleted)
                        busy.update(self.inflight)
                        fresh = [e for e in claimed.entries if e.id not in busy]
                        if fresh:
                            self.totals.reclaimed += len(fresh)
                            log.info("reclaimed %d idle entries", len(fresh))
                            await self._send(send, fresh)
                if s.consumer_remove_idle_ms:
                    removal_failing = await self._remove_idle_consumers(removal_failing)
                await trio.sleep(s.reclaim_interval_ms / 1000)

    async def _remove_idle_consumers(self, failing: bool) -> bool:
        """After a reclaim pass a dead consumer's idle entries are ours, so it has nothing pending and
        goes (the script re-checks that, atomically: consumers.py). Housekeeping: whatever fails (an ACL
        without XINFO or EVAL, Redis down) is one warning, and the reclaimer goes on. Returns whether it
        failed this time."""
        try:
            removed = await self.parts.stream.remove_idle_consumers(self.options.consumer_remove_idle_ms)
        except Exception as exc:
            if not failing:
                log.warning("idle consumers not removed: %s: %s", type(exc).__name__, exc)
            return True
        if removed:
            log.info(
                "removed %d idle consumers with nothing pending: %s", len(removed), ", ".join(removed[:10])
            )
        return False

    async def _analyse(
        self, recv: trio.MemoryReceiveChannel[Batch], send: trio.MemorySendChannel[tuple[Batch, Analysed]]
    ) -> None:
        with recv, send:
            async for batch in recv:
                await self.parts.store.rows_sent()  # not while the writer needs the GIL
                analysed = await self.processor.analyse(batch.entries)
                try:
                    await send.send((batch, analysed))
                except trio.BrokenResourceError:
                    return  # the writer stopped at the end of the grace period: this batch stays pending

    async def _write(
        self, recv: trio.MemoryReceiveChannel[tuple[Batch, Analysed]], background: trio.CancelScope
    ) -> None:
        with recv:
            async for batch, analysed in recv:
                with trio.CancelScope(shield=True, deadline=self._deadline) as scope:
                    self._commits.add(scope)
                    self._committing = (batch, time.monotonic())
                    try:
                        outcome = await self.processor.commit(analysed)
                    finally:
                        self._commits.discard(scope)
                        self._committing = None
                if scope.cancelled_caught:
                    # Cut by the end of the grace period: these entries stay pending for reclaim.
                    log.warning("grace period over: %d entries left pending", len(self.inflight))
                    break
                for entry in batch.entries:
                    self.inflight.pop(entry.id, None)
                    self._released.discard(entry.id)
                self.totals.add(outcome)
                self.last_progress = time.monotonic()
                for hook in self.on_commit:
                    hook(outcome, analysed, batch)
        background.cancel()  # every producer is done: the helpers have nothing left to look after

    async def _background(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew_leases)
                nursery.start_soon(self._summaries)
                if self.options.stream_retention_s:
                    nursery.start_soon(self._retain)

    async def _renew_leases(self) -> None:
        """Reset the idle time of entries in flight (XCLAIM … JUSTID to ourselves) well before
        CLAIM_MIN_IDLE_MS, so a slow batch is not reclaimed by another worker while we work on it."""
        period = max(self.options.claim_min_idle_ms / 3000, 0.001)
        while True:
            await trio.sleep(period)
            stuck = self.stuck()
            if stuck and self._stuck_reported is not stuck[0]:
                self._stuck_reported = stuck[0]
                entries = stuck[0].entries
                log.warning(
                    "batch of %d entries (%s … %s) made no progress for %.0f s writing to PostgreSQL and "
                    "acking (PostgreSQL %s, Redis %s): releasing the leases of it and of the %d entries "
                    "queued behind it, so that another worker can take them over",
                    len(entries),
                    entries[0].id,
                    entries[-1].id,
                    stuck[1],
                    "up" if self.parts.postgres.up else f"down: {self.parts.postgres.reason}",
                    "up" if self.parts.redis.up else f"down: {self.parts.redis.reason}",
                    len(self.inflight) - len(entries),
                )
            # Stuck: everything queued behind the writer waits as long, so no lease is renewed.
            if stuck:
                self._released.update(self.inflight)
            elif self._released:
                await self._take_back_released()
            ids = [] if stuck else [i for i in self.inflight if i not in self._released]
            if ids:
                await retrying(self.parts.redis, self.parts.stream.renew, ids)

    async def _take_back_released(self) -> None:
        """The writer moves again: entries released while it was stuck that are still ours (no other
        worker claimed them meanwhile) get their leases back; the others stay with whoever took them."""
        p = self.parts
        released = sorted((i for i in self.inflight if i in self._released), key=id_key)
        if released:
            mine = await retrying(
                p.redis, partial(p.stream.pending, 2 * len(self.inflight) + 100, own=True, start=released[0])
            )
            self._released.difference_update(e.id for e in mine)
        self._released.intersection_update(self.inflight)

    def stuck(self) -> tuple[Batch, float] | None:
        """The batch in the writer and for how long, if longer than STUCK_BATCH_S. (Read by the
        /healthz thread too: plain attribute reads.)"""
        committing = self._committing
        if committing is None:
            return None
        waited = time.monotonic() - committing[1]
        return (committing[0], waited) if waited > self.options.stuck_batch_s else None

    async def _retain(self) -> None:
        """STREAM_RETENTION: acked entries pile up (XACK does not delete); trim those older than the
        retention and older than anything a group still has pending or unread."""
        age_ms = self.options.stream_retention_s * 1000
        failing = False
        while True:
            try:
                trimmed = await self.parts.stream.trim_acked(age_ms)
            except Exception as exc:  # fail closed: whatever went wrong, this round trims nothing
                if not failing:
                    log.warning("retention skipped: %s: %s (nothing trimmed)", type(exc).__name__, exc)
                failing = True
            else:
                if failing:
                    log.info("retention works again")
                failing = False
                if trimmed:
                    log.info("retention trimmed %d acked entries", trimmed)
            await trio.sleep(min(60.0, max(1.0, self.options.stream_retention_s / 4)))

    async def _summaries(self, every: float = 30.0) -> None:
        """Every 30 s one line: rate, backlog, outcomes and errors (not a line per post)."""
        last, last_t = attrs.evolve(self.totals), trio.current_time()
        while True:
            await trio.sleep(every)
            t, now = self.totals, trio.current_time()
            try:
                backlog = (await self.parts.stream.group_info())["backlog"]
            except TransientError:
                backlog = -1  # Redis is down: the outage has its own log line
            log.info(
                "%.1f posts/s, backlog %d, in flight %d; written %d, duplicates %d, dead-lettered %d, "
                "analysis errors %d, reclaimed %d",
                (t.written - last.written) / max(now - last_t, 1e-9),
                backlog,
                len(self.inflight),
                t.written,
                t.duplicates,
                t.dead_lettered,
                t.retried,
                t.reclaimed,
            )
            last, last_t = attrs.evolve(t), now

    # -- helpers -----------------------------------------------------------------------------------------

    async def _next_page(self, start: str, *, own: bool, idle_ms: int | None) -> Page:
        s = self.options
        return await next_page(
            self.parts,
            start,
            own=own,
            idle_ms=idle_ms,
            batch_size=self._read_size,
            max_deliveries=s.max_deliveries,
        )

    async def _send(self, send: trio.MemorySendChannel[Batch], entries: list[Entry]) -> None:
        """Hand on what a read or a claim brought, in batches of at most BATCH_BYTES; the next read or
        claim takes as many entries as fit at the size of the largest of these (entries.read_count)."""
        sizes = [entry_size(e) for e in entries]
        self._read_size = read_count(sizes, self.options.batch_size, self._read_size)
        for e in entries:  # all of them in flight now: the leases of those still to send are renewed
            self.inflight[e.id] = None
        self.totals.read += len(entries)
        for batch in by_bytes(entries, sizes):
            await send.send(Batch(tuple(batch)))

    async def _ack_deleted(self, ids: list[str]) -> None:
        if ids:
            await retrying(self.parts.redis, self.parts.stream.ack, ids)
            self._note_deleted(ids)

    def _note_deleted(self, ids: Sequence[str]) -> None:
        """Pending IDs whose stream entry was deleted (XDEL, trimming) cannot be processed: acked."""
        if ids:
            self.totals.deleted += len(ids)
            log.warning("acked %d pending entries that were deleted from the stream", len(ids))
