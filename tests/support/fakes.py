"""In-memory fakes behind the same Protocols as the real stream, store and analyzer.

They keep consumer-group semantics (pending list, delivery counts, idle time on trio's clock) so the
pipeline's logic runs under the autojump clock; what only Redis/PostgreSQL can show is tested for real."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import trio

from sentiment.analysis.base import Analysis
from sentiment.analysis.labels import EMOTIONS, SENTIMENTS
from sentiment.entries import Claimed, DeadLetter, Entry, PendingEntry, id_key
from sentiment.errors import ModelError, StoreUnavailable, StreamUnavailable
from sentiment.rows import Record, WriteResult


@attrs.define
class _Pending:
    consumer: str
    delivered_at: float
    count: int


class FakeGroup:
    """The shared state of one stream and one consumer group."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[bytes, bytes]] = {}
        self.last_delivered = "0-0"
        self.pel: dict[str, _Pending] = {}
        self.acked: list[str] = []
        self.dead: list[tuple[DeadLetter, str]] = []
        self.attempts: dict[str, int] = {}  # the attempts hash: entry ID (or ID:solo) → count
        self._seq = 0
        self.new_entry = trio.Event()

    def add(self, fields: Mapping[str, str | bytes]) -> str:
        self._seq += 1
        entry_id = f"{1_700_000_000_000 + self._seq}-0"
        self.entries[entry_id] = {
            k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()
        }
        self.new_entry.set()
        self.new_entry = trio.Event()
        return entry_id

    def stream(self, consumer: str = "c1") -> FakeStream:
        return FakeStream(self, consumer)


class FakeStream:
    def __init__(self, group: FakeGroup, consumer: str) -> None:
        self.g = group
        self.consumer = consumer
        self.fail_next: dict[str, int] = {}  # operation name → how many calls fail with StreamUnavailable
        self.calls: list[str] = []

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        for key in (op, "*"):  # "*": Redis is down, every operation fails
            if self.fail_next.get(key, 0) > 0:
                self.fail_next[key] -= 1
                raise StreamUnavailable(f"injected {op} failure")

    async def ping(self) -> bool:
        await trio.lowlevel.checkpoint()
        self._maybe_fail("ping")
        return True

    async def ensure_group(self) -> None:
        self._maybe_fail("ensure_group")

    async def check_keys(self) -> None:
        self._maybe_fail("check_keys")

    async def read(self, start: str, count: int, block_ms: int | None) -> tuple[list[Entry], list[str]]:
        await trio.lowlevel.checkpoint()
        self._maybe_fail("read")
        now = trio.current_time()
        if start != ">":
            mine = sorted((i for i, p in self.g.pel.items() if p.consumer == self.consumer), key=id_key)
            mine = [i for i in mine if start == "0" or id_key(i) > id_key(start)][:count]
            entries = [Entry(i, self.g.entries[i], self.g.pel[i].count) for i in mine if i in self.g.entries]
            return entries, [i for i in mine if i not in self.g.entries]
        fresh = [i for i in self.g.entries if id_key(i) > id_key(self.g.last_delivered)][:count]
        if not fresh and block_ms:
            with trio.move_on_after(block_ms / 1000):
                await self.g.new_entry.wait()
            return await self.read(">", count, None)
        for i in fresh:
            self.g.pel[i] = _Pending(self.consumer, now, 1)
            self.g.last_delivered = i
        return [Entry(i, self.g.entries[i]) for i in fresh], []

    async def claim(self, ids: Sequence[str], min_idle_ms: int) -> list[str]:
        self._maybe_fail("renew")
        now, claimed = trio.current_time(), []
        for i in ids:
            p = self.g.pel.get(i)
            if p is not None and (now - p.delivered_at) * 1000 >= min_idle_ms:
                self.g.pel[i] = _Pending(self.consumer, now, p.count)
                claimed.append(i)
        return claimed

    async def peek_oversized(self, entry_id: str) -> Entry | None:
        await trio.lowlevel.checkpoint()
        return None  # the fake holds no entry too large to read (the real Redis is tested for it)

    async def autoclaim(self, cursor: str, min_idle_ms: int, count: int) -> Claimed:
        await trio.lowlevel.checkpoint()
        self._maybe_fail("autoclaim")
        now = trio.current_time()
        ids = sorted((i for i in self.g.pel if id_key(i) >= id_key(cursor)), key=id_key)
        claimed, deleted = [], []
        for i in ids:
            if len(claimed) + len(deleted) >= count:
                return Claimed(i, tuple(claimed), tuple(deleted))
            p = self.g.pel[i]
            if (now - p.delivered_at) * 1000 < min_idle_ms:
                continue
            if i not in self.g.entries:
                del self.g.pel[i]
                deleted.append(i)
                continue
            self.g.pel[i] = _Pending(self.consumer, now, p.count + 1)
            claimed.append(Entry(i, self.g.entries[i], p.count + 1))
        return Claimed("0-0", tuple(claimed), tuple(deleted))

    async def with_deliveries(self, entries: Sequence[Entry]) -> list[Entry]:
        return [
            attrs.evolve(e, deliveries=self.g.pel[e.id].count) if e.id in self.g.pel else e for e in entries
        ]

    async def ack(self, ids: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        self._maybe_fail("ack")
        for i in ids:
            if self.g.pel.pop(i, None) is not None:
                self.g.acked.append(i)

    async def dead_letter(self, letters: Sequence[DeadLetter], tried: dict[str, str]) -> None:
        """Like Redis: stores copies only; the entries stay pending until acked."""
        await trio.lowlevel.checkpoint()
        if letters:
            self._maybe_fail("dead_letter")
        for letter in letters:
            # Like Redis: the ID a copy was given is kept in the attempts hash until the entry is done.
            mark = f"{letter.entry.id}:dead"
            if letter.entry.id not in tried and mark not in self.g.attempts:
                self.g.dead.append((letter, self.consumer))
                tried[letter.entry.id] = f"dead-{len(self.g.dead)}"
                self.g.attempts[mark] = len(self.g.dead)

    async def count_failures(self, ids: Sequence[str]) -> dict[str, int]:
        if ids:
            self._maybe_fail("count_failures")
        for i in ids:
            self.g.attempts[i] = self.g.attempts.get(i, 0) + 1
        return {i: self.g.attempts[i] for i in ids}

    async def solo_started(self, entry_id: str) -> int:
        self._maybe_fail("solo_started")
        key = f"{entry_id}:solo"
        self.g.attempts[key] = self.g.attempts.get(key, 0) + 1
        return self.g.attempts[key]

    async def solo_finished(self, entry_id: str) -> None:
        self.g.attempts.pop(f"{entry_id}:solo", None)

    async def forget(self, ids: Sequence[str]) -> None:
        for i in ids:
            for mark in ("", ":solo", ":dead"):
                self.g.attempts.pop(f"{i}{mark}", None)

    async def renew(self, ids: Sequence[str]) -> None:
        await self.claim(ids, 0)

    async def pending(
        self, count: int, *, own: bool = False, idle_ms: int | None = None, start: str = "-"
    ) -> list[PendingEntry]:
        now = trio.current_time()
        after = start.startswith("(")
        floor = (0, 0) if start == "-" else id_key(start.lstrip("("))
        out = [
            PendingEntry(i, p.consumer, int((now - p.delivered_at) * 1000), p.count)
            for i, p in sorted(self.g.pel.items(), key=lambda kv: id_key(kv[0]))
            if (id_key(i) > floor if after else id_key(i) >= floor)
            and (not own or p.consumer == self.consumer)
            and (idle_ms is None or (now - p.delivered_at) * 1000 >= idle_ms)
        ]
        return out[:count]

    async def group_info(self, count_up_to: int = 0) -> dict[str, int]:
        lag = sum(1 for i in self.g.entries if id_key(i) > id_key(self.g.last_delivered))
        return {"lag": lag, "backlog": min(lag, count_up_to), "pending": len(self.g.pel)}

    async def trim_acked(self, min_age_ms: int) -> int:
        floor = min([id_key(self.g.last_delivered), *(id_key(i) for i in self.g.pel)])
        old = [i for i in self.g.entries if id_key(i) < floor]
        for i in old:
            del self.g.entries[i]
        return len(old)

    async def pending_count(self) -> int:
        self._maybe_fail("pending_count")
        return len(self.g.pel)

    async def remove_idle_consumers(self, min_idle_ms: int) -> list[str]:
        # Consumers are not modelled here (integration/test_consumers.py runs the real script).
        self._maybe_fail("remove_idle_consumers")
        return []


class FakeStore:
    def __init__(self) -> None:
        self.posts: dict[str, Record] = {}
        self.analyses: dict[str, Record] = {}  # one current analysis per post_id
        self.fail_next = 0  # writes that fail with StoreUnavailable after "sending" the rows
        self.commit_then_fail = 0  # writes that commit, then report a broken connection
        self.writes = 0

    async def migrate(self) -> int:
        return 1

    async def check_writable(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def rows_sent(self) -> None:
        await trio.lowlevel.checkpoint()

    async def write(self, records: Sequence[Record]) -> WriteResult:
        await trio.lowlevel.checkpoint()
        self.writes += 1
        if self.fail_next:
            self.fail_next -= 1
            raise StoreUnavailable("injected: connection lost before commit")
        posts = analyses = 0
        conflicts = []
        for r in records:
            if r.post.post_id not in self.posts:
                self.posts[r.post.post_id] = r
                posts += 1
            if self.posts[r.post.post_id].post.content != r.post.content:
                conflicts.append(r.post.entry_id)
                continue
            if r.post.post_id not in self.analyses:
                self.analyses[r.post.post_id] = r
                analyses += 1
        if self.commit_then_fail:
            self.commit_then_fail -= 1
            raise StoreUnavailable("injected: connection cut after commit")
        return WriteResult(posts, analyses, tuple(conflicts))


class FakeAnalyzer:
    """Deterministic: 'bad'/'sad' → negative, else positive. A text containing POISON raises;
    `delay` seconds of trio time per batch simulate a slow model."""

    def __init__(self, delay: float = 0.0) -> None:
        self.name = "fake"
        self.delay = delay
        self.calls: list[list[str]] = []
        self.loaded = True
        self.in_process = True

    async def load(self) -> None:
        return None

    def cache_key(self, text: str) -> str:
        return text

    async def analyze(self, texts: Sequence[str]) -> list[Analysis]:
        self.calls.append(list(texts))
        if self.delay:
            await trio.sleep(self.delay)
        if any("POISON" in t for t in texts):
            raise ModelError("poisoned text")
        out = []
        for t in texts:
            negative = "bad" in t or "sad" in t
            s = {x: 0.0 for x in SENTIMENTS}
            s["negative" if negative else "positive"] = 1.0
            e = {x: 0.0 for x in EMOTIONS}
            e["sadness" if negative else "joy"] = 1.0
            out.append(Analysis(s, e, self.name))
        return out
