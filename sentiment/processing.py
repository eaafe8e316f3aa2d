"""What happens to one batch of entries: validate → analyse → write → ack (or dead-letter).

Shared by the worker's stages (pipeline.py) and by scripts/reclaim.py, so both take the same path.
A poison entry never blocks its batch: a batch that fails as a whole is retried text by text (analysis) or
row by row (write), and only the culprit is held back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
import trio

from .analysis.base import Analysis, Analyzer
from .config import Settings
from .errors import InvalidPost, ModelError, StoreError
from .post import Post
from .retry import Service, retrying
from .store import Record, Store
from .stream import DeadLetter, Entry, Stream

log = logging.getLogger(__name__)


@attrs.frozen
class Analysed:
    """A batch after analysis: rows to write, entries to dead-letter, entries left pending for a retry."""

    records: tuple[Record, ...] = ()
    dead: tuple[DeadLetter, ...] = ()
    retry: tuple[Entry, ...] = ()
    inference_s: float = 0.0
    entries: tuple[Entry, ...] = ()  # the batch as read, for dead-lettering a row PostgreSQL rejects


@attrs.frozen
class Outcome:
    written: int = 0  # entries whose rows are committed and which are acked
    duplicates: int = 0  # of those, entries whose analysis row already existed (a redelivery)
    dead_lettered: int = 0
    retried: int = 0  # left pending: analysis failed below MAX_DELIVERIES


class Processor:
    def __init__(self, settings: Settings, stream: Stream, store: Store, analyzer: Analyzer) -> None:
        self.settings = settings
        self.stream = stream
        self.store = store
        self.analyzer = analyzer
        self.redis = Service("Redis")
        self.postgres = Service("PostgreSQL")

    async def analyse(self, entries: Sequence[Entry]) -> Analysed:
        posts: list[Post] = []
        dead: list[DeadLetter] = []
        for entry in entries:
            if entry.deliveries > self.settings.max_deliveries:
                dead.append(DeadLetter(entry, f"delivered {entry.deliveries} times, over MAX_DELIVERIES"))
                continue
            try:
                posts.append(Post.from_fields(entry.id, entry.fields, self.settings.max_content_bytes))
            except InvalidPost as exc:
                dead.append(DeadLetter(entry, f"invalid post: {exc.reason}"))
        started = trio.current_time()
        results = await self._analyse_isolated([p.content for p in posts])
        inference_s = trio.current_time() - started
        by_id = {e.id: e for e in entries}
        records, retry = [], []
        for post, result in zip(posts, results, strict=True):
            if isinstance(result, Analysis):
                records.append(Record(post, result))
                continue
            entry = by_id[post.entry_id]
            if entry.deliveries >= self.settings.max_deliveries:
                dead.append(DeadLetter(entry, f"analysis failed {entry.deliveries} times: {result}"))
            else:
                log.warning(
                    "analysis failed for entry %s (delivery %d): %s",
                    entry.id,
                    entry.deliveries,
                    result,
                    extra={"entry_id": entry.id, "post_id": post.post_id},
                )
                retry.append(entry)
        return Analysed(tuple(records), tuple(dead), tuple(retry), inference_s, tuple(entries))

    async def _analyse_isolated(self, texts: list[str]) -> list[Analysis | str]:
        """Analyse the batch; if it fails, each text alone, so one bad text costs only itself."""
        if not texts:
            return []
        try:
            return list(await self.analyzer.analyze(texts))
        except Exception as exc:  # any analyzer error: isolate below, never crash the worker
            if not self.analyzer.loaded:
                # A model that cannot load is no post's fault: stop, leaving every entry pending.
                raise ModelError(f"the model could not be loaded: {exc}") from exc
            if len(texts) == 1:
                return [f"{type(exc).__name__}: {exc}"]
        out: list[Analysis | str] = []
        for text in texts:
            out.extend(await self._analyse_isolated([text]))
        return out

    async def commit(self, analysed: Analysed) -> Outcome:
        """Write the rows in one transaction, then ack them and dead-letter the rejects.

        Callers run this shielded: a commit and its ack are never cut apart by a cancellation, except by
        the worker's hard stop after the grace period, which leaves the entries pending (never acked
        early)."""
        records = list(analysed.records)
        dead = list(analysed.dead)
        duplicates = 0
        if records:
            try:
                result = await retrying(self.postgres, self.store.write, records)
                duplicates = len(records) - result.analyses_inserted
            except StoreError:
                records, rejected, duplicates = await self._write_one_by_one(records, analysed.entries)
                dead.extend(rejected)
        ids = [r.post.entry_id for r in records]
        await retrying(self.redis, self.stream.ack, ids)
        await retrying(self.redis, self.stream.dead_letter, dead, self.settings.consumer)
        for letter in dead:
            log.warning(
                "dead-lettered entry %s: %s",
                letter.entry.id,
                letter.reason,
                extra={"entry_id": letter.entry.id},
            )
        return Outcome(len(records), duplicates, len(dead), len(analysed.retry))

    async def _write_one_by_one(
        self, records: list[Record], entries: Sequence[Entry]
    ) -> tuple[list[Record], list[DeadLetter], int]:
        by_id = {e.id: e for e in entries}
        written, rejected, duplicates = [], [], 0
        for record in records:
            try:
                result = await retrying(self.postgres, self.store.write, [record])
            except StoreError as exc:
                rejected.append(DeadLetter(by_id[record.post.entry_id], f"rejected by PostgreSQL: {exc}"))
                continue
            written.append(record)
            duplicates += 1 - result.analyses_inserted
        return written, rejected, duplicates
