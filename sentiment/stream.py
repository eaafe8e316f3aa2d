"""The stream source: a Redis Stream read through a consumer group, the dead-letter stream beside it,
and the hash of per-entry attempt counts."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import redis.exceptions as rex

from . import deadletter
from .entries import Claimed, DeadLetter, Entry, PendingEntry, id_key
from .errors import ConfigError, StreamUnavailable
from .group_state import GroupState
from .post import Measured
from .redact import one_line
from .redis_client import NoGroup, RedisClient, decode, no_such_key

T = TypeVar("T")
log = logging.getLogger(__name__)


class RedisStream(GroupState):
    """Stream on Redis, through a `RedisClient` (see redis_client.py for how commands reach Redis)."""

    def __init__(
        self,
        client: RedisClient,
        *,
        stream: str,
        group: str,
        consumer: str,
        dead_letter: str,
        attempts: str,
        dead_letter_max_bytes: int,
        max_entry_bytes: int,
        max_entry_fields: int,
    ) -> None:
        self._client = client
        self._on_master = client.to_master_of(stream)  # reads and pings: routed by the slot map
        self.name = stream
        self.group = group
        self.consumer = consumer
        self.dead = dead_letter
        self.attempts = attempts
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.max_entry_fields = max_entry_fields

    @property
    def _redis(self) -> Any:
        return self._client.raw  # read at each command: the client may have been rebuilt

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        try:
            return await self._client.call(fn, *args, **kwargs)
        except NoGroup as exc:
            # Redis restarted without persistence, or someone deleted the key: build it again.
            await self.ensure_group()
            raise StreamUnavailable(
                f"consumer group {self.group} was missing and has been recreated"
            ) from exc

    async def ping(self) -> bool:
        await self._call(self._on_master, "PING")
        return True

    async def ensure_group(self) -> None:
        # From ID 0, not `$`: posts published before the first worker started are not skipped.
        try:
            await self._call(self._redis.xgroup_create, self.name, self.group, id="0", mkstream=True)
        except rex.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def check_keys(self) -> None:
        """At start-up: the keys we write must hold what we write to them, or nothing yet (ConfigError)."""
        expected = {
            self.name: ("stream", "REDIS_STREAM_NAME"),
            self.dead: ("stream", "DEAD_LETTER_STREAM"),
            self.attempts: ("hash", "the attempt counts key"),
        }
        for key, (kind, what) in expected.items():
            found = decode(await self._call(self._redis.type, key))
            if found not in ("none", kind):
                raise ConfigError(
                    f"{what} {key!r} holds a {found}, not a {kind}: choose another key or delete it"
                )

    async def read(self, start: str, count: int, block_ms: int | None) -> tuple[list[Entry], list[str]]:
        """XREADGROUP from `start` (`>` for new entries, an ID for our own pending ones).

        Returns the entries and the IDs of pending entries whose stream entry was deleted."""
        block = ("BLOCK", block_ms) if block_ms is not None else ()
        reply: Any = await self._call(
            self._on_master,
            *("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, *block),
            *("STREAMS", self.name, start),
        )
        entries: list[Entry] = []
        deleted: list[str] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                if entry_id is None:
                    continue
                (
                    entries.append(Entry(decode(entry_id), fields))
                    if fields
                    else deleted.append(decode(entry_id))
                )
        return entries, deleted

    async def autoclaim(self, cursor: str, min_idle_ms: int, count: int) -> Claimed:
        reply = await self._call(
            self._redis.xautoclaim,
            self.name,
            self.group,
            self.consumer,
            min_idle_ms,
            start_id=cursor,
            count=count,
        )
        next_cursor, items = reply[0], reply[1]
        deleted = tuple(decode(x) for x in reply[2]) if len(reply) > 2 else ()
        entries = [Entry(decode(i), f) for i, f in items if i is not None and f]
        return Claimed(decode(next_cursor), tuple(await self.with_deliveries(entries)), deleted)

    async def claim(self, ids: Sequence[str], min_idle_ms: int) -> list[str]:
        """XCLAIM … JUSTID: those of `ids` idle `min_idle_ms` or more become ours (their idle time reset,
        their delivery count not raised) without their bodies being sent. Returns the IDs claimed."""
        if not ids:
            return []
        claimed: Any = await self._call(
            self._redis.xclaim, self.name, self.group, self.consumer, min_idle_ms, list(ids), justid=True
        )
        return [decode(i) for i in claimed]

    async def peek_oversized(self, entry_id: str) -> Entry | None:
        """The entry measured inside Redis: None if it is within the raw bounds (or gone), else a copy of
        its first DEAD_LETTER_MAX_BYTES with `measured` set. An entry too large for the worker's memory
        kills every process that reads it; this never sends it whole."""
        try:
            reply: Any = await self._call(
                self._redis.eval,
                _PEEK,
                1,
                self.name,
                entry_id,
                self.max_entry_bytes,
                self.max_entry_fields,
                self.dead_letter_max_bytes,
            )
        except (StreamUnavailable, rex.ResponseError) as exc:
            if isinstance(exc, StreamUnavailable) and not isinstance(exc.__cause__, rex.NoPermissionError):
                raise  # an outage: waited out by the caller
            # An ACL without EVAL or XRANGE in scripts: the entry is read as before, alone (a crash at
            # worst, counted like any other, not a stall).
            log.warning("cannot measure entry %s in Redis (%s): reading it", entry_id, one_line(str(exc)))
            return None
        if not reply:
            return None
        size, count, flat = reply
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        return Entry(entry_id, fields, measured=Measured(int(size), int(count)))

    async def with_deliveries(self, entries: Sequence[Entry]) -> list[Entry]:
        """The same entries with their delivery counts (XPENDING), for redelivered ones."""
        if not entries:
            return []
        ids = [e.id for e in entries]
        rows = await self._call(
            self._redis.xpending_range,
            self.name,
            self.group,
            min=min(ids, key=id_key),
            max=max(ids, key=id_key),
            count=max(len(ids) * 2, 1000),
            consumername=self.consumer,
        )
        counts = {decode(r["message_id"]): int(r["times_delivered"]) for r in rows}
        return [attrs.evolve(e, deliveries=counts.get(e.id, e.deliveries)) for e in entries]

    async def ack(self, ids: Sequence[str]) -> None:
        if ids:
            await self._call(self._redis.xack, self.name, self.group, *ids)

    async def dead_letter(self, letters: Sequence[DeadLetter], tried: dict[str, str]) -> None:
        """Store a copy of each entry in the dead-letter stream; acking is the caller's next step.

        No MULTI: Redis runs the XACK of a MULTI even when its XADD fails. Each copy gets an ID we
        choose, recorded in `tried` (entry ID → dead-letter ID; the caller keeps it across retries) and,
        before the XADD, in the attempts hash (`<entry ID>:dead`, dropped by `forget` after the XACK): a
        try whose reply was lost, or whose process died before the XACK, is found by that ID instead of
        being added twice."""
        if not letters:
            return
        unknown = [x.entry.id for x in letters if x.entry.id not in tried]
        if unknown:
            earlier: Any = await self._call(self._redis.hmget, self.attempts, [f"{i}:dead" for i in unknown])
            tried.update({i: decode(d) for i, d in zip(unknown, earlier, strict=True) if d})
        landed = await self._landed([(x.entry.id, tried[x.entry.id]) for x in letters if x.entry.id in tried])
        todo = [x for x in letters if x.entry.id not in landed]
        if not todo:
            return
        try:
            top_ms, top_seq = await self._last_dead_id()
        except StreamUnavailable as exc:
            raise StreamUnavailable(f"cannot add to DEAD_LETTER_STREAM {self.dead!r}: {exc}") from exc
        now_ms = int(time.time() * 1000)
        # A random sequence part keeps workers that dead-letter in the same millisecond apart.
        if now_ms > top_ms:
            base_ms, base_seq = now_ms, random.getrandbits(40)
        else:
            base_ms, base_seq = top_ms, top_seq + 1 + random.getrandbits(20)
        pipe = self._redis.pipeline(transaction=False)
        for i, letter in enumerate(todo):
            dead_id = f"{base_ms}-{base_seq + i}"
            tried[letter.entry.id] = dead_id
            pipe.hset(self.attempts, f"{letter.entry.id}:dead", dead_id)
            fields = deadletter.encode(
                fields=letter.entry.fields,
                reason=letter.reason,
                entry_id=letter.entry.id,
                stream=self.name,
                group=self.group,
                deliveries=letter.entry.deliveries,
                consumer=self.consumer,
                now_ms=now_ms,
                max_bytes=None if letter.whole else self.dead_letter_max_bytes,
                measured=letter.entry.measured,
            )
            pipe.xadd(self.dead, fields, id=dead_id)
        results: Any = await self._call(pipe.execute, raise_on_error=False)
        for result in results:
            if isinstance(result, rex.ResponseError) and "equal or smaller" in str(result):
                # Another worker's copy took a higher ID first: the retry checks what landed and picks
                # new IDs above the top.
                raise StreamUnavailable("a dead-letter ID was taken by another worker; choosing again")
            if isinstance(result, Exception):
                raise StreamUnavailable(
                    f"cannot add to DEAD_LETTER_STREAM {self.dead!r}: {result}; entries stay pending"
                ) from result

    async def _last_dead_id(self) -> tuple[int, int]:
        """The highest ID the dead-letter stream ever gave out (a deleted top entry still counts: new IDs
        must be above it)."""
        try:
            info: Any = await self._call(self._redis.xinfo_stream, self.dead)
        except rex.ResponseError as exc:
            if no_such_key(exc):
                return (0, 0)
            raise
        return id_key(decode(info["last-generated-id"]))

    async def last_dead_id(self) -> str:
        ms, seq = await self._last_dead_id()
        return f"{ms}-{seq}"

    async def _landed(self, tries: Sequence[tuple[str, str]]) -> set[str]:
        """Entry IDs whose copy is already in the dead-letter stream under the ID tried for it."""
        if not tries:
            return set()
        pipe = self._redis.pipeline(transaction=False)
        for _, dead_id in tries:
            pipe.xrange(self.dead, dead_id, dead_id)
        found: Any = await self._call(pipe.execute)
        landed = set()
        for (entry_id, _), rows in zip(tries, found, strict=True):
            if not rows:
                continue
            copy = rows[0][1]
            if copy.get(b"entry_id") == entry_id.encode() and copy.get(b"stream") == self.name.encode():
                landed.add(entry_id)
        return landed

    # -- attempt accounting ------------------------------------------------------------------------------
    # Redis counts deliveries, and they rise on every crash, restart and reclaim. What counts against
    # MAX_DELIVERIES is kept here instead, in one hash per stream and group: `<entry ID>` counts the
    # failures that were the entry's own (its text made the model fail); `<entry ID>:solo` counts
    # analyses of the entry on its own that began and never ended (the process died with it);
    # `<entry ID>:dead` is the ID its dead-letter copy was given (see dead_letter).

    async def count_failures(self, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hincrby(self.attempts, entry_id, 1)
        counts: Any = await self._call(pipe.execute)
        return {entry_id: int(n) for entry_id, n in zip(ids, counts, strict=True)}

    async def solo_started(self, entry_id: str) -> int:
        return int(await self._call(self._redis.hincrby, self.attempts, f"{entry_id}:solo", 1))

    async def solo_finished(self, entry_id: str) -> None:
        await self._call(self._redis.hdel, self.attempts, f"{entry_id}:solo")

    async def forget(self, ids: Sequence[str]) -> None:
        """Drop the counts and marks of entries that are done (acked)."""
        if ids:
            marks = [f"{i}{mark}" for i in ids for mark in ("", ":solo", ":dead")]
            await self._call(self._redis.hdel, self.attempts, *marks)

    # -- the dead-letter stream, for the operator's commands -------------------------------------------

    async def dead_range(self, start: str, end: str, count: int) -> list[tuple[str, dict[bytes, bytes]]]:
        rows: Any = await self._call(self._redis.xrange, self.dead, start, end, count=count)
        return [(decode(i), dict(f)) for i, f in rows]

    async def publish(self, stream: str, fields: Mapping[bytes, bytes]) -> str:
        return decode(await self._call(self._redis.xadd, stream, dict(fields)))

    async def remove_dead(self, ids: Sequence[str]) -> int:
        return int(await self._call(self._redis.xdel, self.dead, *ids)) if ids else 0

    async def trim_dead(self, before: str) -> int:
        try:
            return int(await self._call(self._redis.xtrim, self.dead, minid=before, approximate=False))
        except rex.ResponseError as exc:
            raise ConfigError(f"--before must be a stream ID such as 1767225600000-0: {exc}") from None

    async def renew(self, ids: Sequence[str]) -> None:
        """Our own in-flight entries claimed again: their idle time reset, not their delivery count."""
        await self.claim(ids, 0)

    async def pending(
        self, count: int, *, own: bool = False, idle_ms: int | None = None, start: str = "-"
    ) -> list[PendingEntry]:
        """XPENDING's extended form from `start` (an ID, `(ID` for after it, or `-`): IDs, owners, idle
        times and delivery counts, without the entries' bodies. `own`: only our consumer's."""
        rows = await self._call(
            self._redis.xpending_range,
            self.name,
            self.group,
            min=start,
            max="+",
            count=count,
            consumername=self.consumer if own else None,
            idle=idle_ms,
        )
        return [
            PendingEntry(
                decode(r["message_id"]),
                decode(r["consumer"]),
                int(r["time_since_delivered"]),
                int(r["times_delivered"]),
            )
            for r in rows
        ]

    async def pending_count(self) -> int:
        summary = await self._call(self._redis.xpending, self.name, self.group)
        return int(summary["pending"])


# One entry's size, measured where it lies (ARGV: ID, byte and field bounds, bytes to copy). Within the
# bounds: nil. Over them: its bytes, its field count, and its first fields cut to the copy budget (names
# to 1 KB). Lua's copy of the entry lives in Redis only for the call.
_PEEK = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return false end
local flat, size = found[1][2], 0
for i = 1, #flat do size = size + #flat[i] end
if size <= tonumber(ARGV[2]) and #flat / 2 <= tonumber(ARGV[3]) then return false end
local copy, budget = {}, tonumber(ARGV[4])
for i = 1, #flat, 2 do
  if budget <= 0 then break end
  local name = string.sub(flat[i], 1, math.min(budget, 1024))
  local value = string.sub(flat[i + 1], 1, math.max(budget - #name, 0))
  copy[#copy + 1] = name
  copy[#copy + 1] = value
  budget = budget - #name - #value
end
return {size, #flat / 2, copy}
"""
