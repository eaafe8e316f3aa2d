"""What happens to one batch of entries: validate → analyse → write → dead-letter → ack.

Shared by the worker's stages (worker.py) and by the reclaim command, so both take the same path.
A poison entry never blocks its batch: a batch that fails as a whole is retried in halves down to single
texts (analysis) or row by row (write), and only the culprit is held back.

Attempts, not deliveries, decide the dead-letter stream. Redis's delivery count rises on every crash,
restart and reclaim, so it says nothing about whose fault a failure was. What counts against
MAX_DELIVERIES is only the entry's own failures (its text made the model fail), counted in Redis by
the stream. An entry delivered more often than MAX_DELIVERIES is analysed on its own: if the process dies
while doing that (a text that segfaults or exhausts memory), SOLO_CRASHES times, the entry is
dead-lettered. So one such post causes at most MAX_DELIVERIES + SOLO_CRASHES crashes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
import trio

from .analysis.base import Analysis, analyse_each, probe
from .entries import DeadLetter, Entry, id_key
from .errors import ConfigError, InvalidPost, ModelError, StoreError
from .parts import Parts
from .post import Limits, Post
from .retry import retrying
from .rows import Record

log = logging.getLogger(__name__)

SOLO_CRASHES = 2  # deaths of the process while analysing one entry alone before it is dead-lettered
FORGET_TIMEOUT_S = 2.0  # bound on clearing a solo mark while cancelled


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
    def __init__(self, parts: Parts, *, limits: Limits, max_deliveries: int) -> None:
        self.stream, self.store, self.analyzer = parts.stream, parts.store, parts.analyzer
        self.cache = parts.cache
        self.redis, self.postgres, self.model = parts.redis, parts.postgres, parts.model
        self.limits = limits
        self.max_deliveries = max_deliveries

    async def prepare(self) -> None:
        """Everything that must hold before the first entry is read, so that no entry is read (and its
        delivery count raised) by a worker that cannot process it: our keys hold what we write there, the
        group exists, the schema is current and writable, the model is loaded. Outages and missing
        grants are waited out with backoff (one log line, readyz 503); a wrong setting raises."""
        await retrying(self.redis, self.stream.check_keys)
        await retrying(self.redis, self.stream.ensure_group)
        await retrying(self.postgres, self.store.migrate, max_wait=30.0)
        await retrying(self.postgres, self.store.check_writable, max_wait=30.0)
        try:
            await self.analyzer.load()
        except (ModelError, ConfigError):
            raise  # already says what is wrong and what to do
        except Exception as exc:
            raise ModelError(f"the model could not be loaded: {exc}") from exc

    # -- analysis ----------------------------------------------------------------------------------------

    async def analyse(self, entries: Sequence[Entry]) -> Analysed:
        max_attempts = self.max_deliveries
        # Only a model in this process can be killed by a text: for a remote one, redelivered entries
        # are analysed with the others.
        alone = [e for e in entries if e.deliveries > max_attempts and self.analyzer.in_process]
        alone_ids = {e.id for e in alone}
        dead: list[DeadLetter] = []
        posts: list[Post] = []
        for entry in entries:
            if entry.id not in alone_ids:
                self._parse(entry, posts, dead)
        started = trio.current_time()
        results = await self._analyse([p.content for p in posts])
        pairs = list(zip(posts, results, strict=True))
        for entry in alone:
            pairs.extend(await self._analyse_alone(entry, dead))
        inference_s = trio.current_time() - started

        records: list[Record] = []
        failed: list[tuple[Post, str]] = []
        for post, result in pairs:
            if isinstance(result, Analysis):
                records.append(Record(post, result))
            else:
                failed.append((post, result))
        by_id = {e.id: e for e in entries}
        counts = await retrying(self.redis, self.stream.count_failures, [p.entry_id for p, _ in failed])
        retry: list[Entry] = []
        for post, error in failed:
            entry, n = by_id[post.entry_id], counts[post.entry_id]
            if n >= max_attempts:
                dead.append(DeadLetter(entry, f"analysis failed {n} times: {error}", whole=True))
                continue
            log.warning(
                "analysis failed for entry %s (attempt %d of %d): %s",
                entry.id,
                n,
                max_attempts,
                error,
                extra={"entry_id": entry.id, "post_id": post.post_id},
            )
            retry.append(entry)
        return Analysed(tuple(records), tuple(dead), tuple(retry), inference_s, tuple(entries))

    def _parse(self, entry: Entry, posts: list[Post], dead: list[DeadLetter]) -> None:
        if entry.measured is not None:
            dead.append(DeadLetter(entry, f"invalid post: {self.limits.measured_reason(entry.measured)}"))
            return
        try:
            posts.append(Post.from_fields(entry.id, entry.fields, self.limits, entry.raw_bytes))
        except InvalidPost as exc:
            dead.append(DeadLetter(entry, f"invalid post: {exc.reason}"))

    async def _analyse_alone(self, entry: Entry, dead: list[DeadLetter]) -> list[tuple[Post, Analysis | str]]:
        """An entry delivered more than MAX_DELIVERIES times (crashes, restarts, reclaims): analysed on
        its own, with a mark in Redis that only the death of the process leaves behind."""
        starts = await retrying(self.redis, self.stream.solo_started, entry.id)
        if starts > SOLO_CRASHES:
            reason = f"the worker died {starts - 1} times while analysing this entry on its own"
            dead.append(DeadLetter(entry, reason))
            return []
        try:
            return await self._parse_and_analyse_alone(entry, dead)
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + FORGET_TIMEOUT_S):
                await retrying(self.redis, self.stream.solo_finished, entry.id)

    async def _parse_and_analyse_alone(
        self, entry: Entry, dead: list[DeadLetter]
    ) -> list[tuple[Post, Analysis | str]]:
        posts: list[Post] = []
        self._parse(entry, posts, dead)
        if not posts:
            return []
        return list(zip(posts, await self._analyse([posts[0].content]), strict=True))

    async def _analyse(self, texts: list[str]) -> list[Analysis | str]:
        """Each text's analysis, or the error its text caused. An unavailable model (ModelUnavailable:
        an LLM outage, say) is no text's fault: the batch waits for it, retried with backoff.

        A text seen before (in the cache, or earlier in this batch) is not analysed again."""
        if self.cache is None:
            return await retrying(self.model, self._analyse_or_blame, texts, max_wait=30.0)
        cache = self.cache
        keys = [self.analyzer.cache_key(t) for t in texts]
        known: list[Analysis | None] = [cache.get(k) for k in keys]
        todo: dict[str, str] = {}  # key → the first text with it that needs the model
        for key, text, found in zip(keys, texts, known, strict=True):
            if found is None:
                todo.setdefault(key, text)
        results = await retrying(self.model, self._analyse_or_blame, list(todo.values()), max_wait=30.0)
        fresh = dict(zip(todo, results, strict=True))
        for key, result in fresh.items():
            # Only the analyzer's own answers: not a fallback's (an LLM asked while the local model was
            # down, which read the raw text), which would outlive the outage.
            if isinstance(result, Analysis) and result.model == self.analyzer.name:
                cache.put(key, result)
        cache.count(hits=len(texts) - len(todo), misses=len(todo))
        return [found if found is not None else fresh[key] for key, found in zip(keys, known, strict=True)]

    async def _analyse_or_blame(self, texts: list[str]) -> list[Analysis | str]:
        results = await analyse_each(self.analyzer, texts)
        failed = [i for i, r in enumerate(results) if isinstance(r, str)]
        if not failed:
            return results
        # Before a text is blamed, the model must answer a plain one, and the text must fail again
        # after that. A provider that refuses the account (a 400 for credit, a retired model) or a broken
        # model fails every text alike; one that recovers half-way through the batch fails only those
        # asked first. Neither is the texts' fault.
        await probe(self.analyzer)
        for i in failed:
            [results[i]] = await analyse_each(self.analyzer, [texts[i]])
        return results

    # -- write, dead-letter, ack -------------------------------------------------------------------------

    async def commit(self, analysed: Analysed) -> Outcome:
        """Write the rows in one transaction, store the dead letters, then ack both.

        Callers run this shielded: a commit and its ack are never cut apart by a cancellation, except by
        the worker's hard stop after the grace period, which leaves the entries pending (never acked
        early). An entry is acked only once its rows are committed or its dead-letter copy is stored."""
        by_id = {e.id: e for e in analysed.entries}
        dead = list(analysed.dead)
        written: list[Record] = []
        duplicates = 0
        for records in _rounds(analysed.records):
            ok, rejected, dups = await self._write(records, by_id)
            written += ok
            dead += rejected
            duplicates += dups
        stored = [r.post.entry_id for r in written]
        await retrying(self.redis, self.stream.ack, stored)
        if dead:
            # Acked only once its copy is stored; `tried` is kept across retries to find a copy whose
            # reply was lost.
            tried: dict[str, str] = {}
            await retrying(self.redis, self.stream.dead_letter, dead, tried)
            await retrying(self.redis, self.stream.ack, [d.entry.id for d in dead])
        # Counts and marks to drop: a dead-lettered entry's (its dead-letter ID, perhaps a failure count
        # on its first delivery), a redelivered one's. A first delivery written at once has none.
        done = [i for i in stored if by_id[i].deliveries > 1] + [d.entry.id for d in dead]
        await retrying(self.redis, self.stream.forget, done)
        for letter in dead:
            log.warning(
                "dead-lettered entry %s: %s",
                letter.entry.id,
                letter.reason,
                extra={"entry_id": letter.entry.id},
            )
        return Outcome(len(written), duplicates, len(dead), len(analysed.retry))

    async def _write(
        self, records: list[Record], by_id: dict[str, Entry]
    ) -> tuple[list[Record], list[DeadLetter], int]:
        """One transaction for the rows (else row by row): the records written (new or duplicates), the
        entries to dead-letter (rejected, or a post_id already stored with other content), duplicates."""
        try:
            result = await retrying(self.postgres, self.store.write, records)
            written, conflicts, dead = records, set(result.conflicts), list[DeadLetter]()
            duplicates = len(records) - result.analyses_inserted - len(conflicts)
        except StoreError:
            written, conflicts, dead, duplicates = await self._write_one_by_one(records, by_id)
        for record in written:
            if record.post.entry_id in conflicts:
                reason = f"post_id {record.post.post_id!r} is already stored with other content"
                dead.append(DeadLetter(by_id[record.post.entry_id], reason, whole=True))
        return [r for r in written if r.post.entry_id not in conflicts], dead, duplicates

    async def _write_one_by_one(
        self, records: list[Record], by_id: dict[str, Entry]
    ) -> tuple[list[Record], set[str], list[DeadLetter], int]:
        written: list[Record] = []
        conflicts: set[str] = set()
        rejected: list[DeadLetter] = []
        duplicates = 0
        for record in records:
            try:
                result = await retrying(self.postgres, self.store.write, [record])
            except StoreError as exc:
                reason = f"rejected by PostgreSQL: {exc}"
                rejected.append(DeadLetter(by_id[record.post.entry_id], reason, whole=True))
                continue
            written.append(record)
            conflicts.update(result.conflicts)
            duplicates += 1 - result.analyses_inserted - len(result.conflicts)
        return written, conflicts, rejected, duplicates


def _rounds(records: Sequence[Record]) -> list[list[Record]]:
    """The records in writing rounds: round k holds the k-th entry (in stream order) of each post_id of
    the batch. Each copy of a post_id is written after the ones before it and meets what they stored, as
    if they had come in separate batches: the same content is a duplicate, other content a conflict."""
    rounds: list[list[Record]] = []
    seen: dict[str, int] = {}
    for record in sorted(records, key=lambda r: id_key(r.post.entry_id)):
        k = seen.get(record.post.post_id, 0)
        seen[record.post.post_id] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(record)
    return rounds
