"""The stream source: a Redis Stream read through a consumer group, the dead-letter stream beside it,
and the hash of per-entry attempt counts."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import redis.exceptions as rex

from . import deadletter
from .consumers import REMOVE_IDLE
from .errors import ConfigError, StreamUnavailable
from .redact import one_line
from .redis_client import NoGroup, RedisClient, decode, no_such_key

T = TypeVar("T")


@attrs.frozen
class Entry:
    id: str
    fields: Mapping[bytes, bytes]
    deliveries: int = 1


@attrs.frozen
class Claimed:
    """One XAUTOCLAIM step: the next cursor, the entries now ours, and IDs no longer in the stream."""

    cursor: str
    entries: tuple[Entry, ...]
    deleted: tuple[str, ...]


@attrs.frozen
class PendingEntry:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


@attrs.frozen
class DeadLetter:
    entry: Entry
    reason: str = attrs.field(converter=one_line)


class Stream(Protocol):
    """What the pipeline needs from a stream; RedisStream and the tests' in-memory fake implement it."""

    async def ensure_group(self) -> None: ...
    async def check_keys(self) -> None: ...
    async def read(self, start: str, count: int, block_ms: int | None) -> tuple[list[Entry], list[str]]: ...
    async def autoclaim(self, cursor: str, min_idle_ms: int, count: int) -> Claimed: ...
    async def with_deliveries(self, entries: Sequence[Entry]) -> list[Entry]: ...
    async def ack(self, ids: Sequence[str]) -> None: ...
    async def dead_letter(self, letters: Sequence[DeadLetter], tried: dict[str, str]) -> None: ...
    async def count_failures(self, ids: Sequence[str]) -> dict[str, int]: ...
    async def solo_started(self, entry_id: str) -> int: ...
    async def solo_finished(self, entry_id: str) -> None: ...
    async def forget(self, ids: Sequence[str]) -> None: ...
    async def renew(self, ids: Sequence[str]) -> None: ...
    async def pending(
        self, count: int, *, own: bool = False, idle_ms: int | None = None, start: str = "-"
    ) -> list[PendingEntry]: ...
    async def pending_count(self) -> int: ...
    async def group_info(self) -> dict[str, int]: ...
    async def trim_acked(self, min_age_ms: int) -> int: ...
    async def remove_idle_consumers(self, min_idle_ms: int) -> list[str]: ...


class RedisStream:
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
    ) -> None:
        self._client = client
        self.name = stream
        self.group = group
        self.consumer = consumer
        self.dead = dead_letter
        self.attempts = attempts
        self.dead_letter_max_bytes = dead_letter_max_bytes

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
        await self._call(self._redis.ping)
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
        reply: Any = await self._call(
            self._redis.xreadgroup, self.group, self.consumer, {self.name: start}, count=count, block=block_ms
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
        choose, recorded in `tried` (entry ID → dead-letter ID; the caller keeps it across retries), so a
        try whose reply was lost is found by that ID instead of being added twice."""
        if not letters:
            return
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
            fields = deadletter.encode(
                fields=letter.entry.fields,
                reason=letter.reason,
                entry_id=letter.entry.id,
                stream=self.name,
                group=self.group,
                deliveries=letter.entry.deliveries,
                consumer=self.consumer,
                now_ms=now_ms,
                max_bytes=self.dead_letter_max_bytes,
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
    # analyses of the entry on its own that began and never ended (the process died with it).

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
        """Drop the counts of entries that are done (acked)."""
        if ids:
            await self._call(self._redis.hdel, self.attempts, *ids, *(f"{i}:solo" for i in ids))

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
        """XCLAIM our own in-flight entries with JUSTID: resets their idle time, not their delivery count."""
        if ids:
            await self._call(
                self._redis.xclaim, self.name, self.group, self.consumer, 0, list(ids), justid=True
            )

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

    async def _groups(self) -> list[dict[str, Any]]:
        try:
            groups: list[dict[str, Any]] = await self._call(self._redis.xinfo_groups, self.name)
        except rex.ResponseError as exc:
            if no_such_key(exc):  # the stream does not exist yet
                return []
            raise
        return groups

    async def group_info(self) -> dict[str, int]:
        """Our group's lag (entries not yet delivered to it) and pending count (XINFO GROUPS)."""
        for group in await self._groups():
            if decode(group["name"]) == self.group:
                lag = group.get("lag")
                return {"lag": int(lag) if lag is not None else -1, "pending": int(group["pending"])}
        return {"lag": -1, "pending": 0}

    async def groups(self) -> list[dict[str, Any]]:
        """XINFO GROUPS of the stream, each group with its consumers (XINFO CONSUMERS), for `stats`."""
        out = []
        for g in await self._groups():
            consumers = await self._call(self._redis.xinfo_consumers, self.name, g["name"])
            out.append(g | {"consumers": consumers})
        return out

    async def length(self, key: str) -> int:
        return int(await self._call(self._redis.xlen, key))

    async def remove_idle_consumers(self, min_idle_ms: int) -> list[str]:
        """Remove our group's consumers that have nothing pending and were idle `min_idle_ms` or more,
        never our own (one Lua script, see consumers.py). Returns their names."""
        removed: Any = await self._call(
            self._redis.eval, REMOVE_IDLE, 1, self.name, self.group, min_idle_ms, self.consumer
        )
        return [decode(name) for name in removed]

    async def trim_acked(self, min_age_ms: int) -> int:
        """Trim entries older than `min_age_ms` that every group has read and acked (XTRIM MINID): the
        floor is the oldest pending ID of any group and the first ID after any group's last delivered one,
        so retention never drops work a group still owes.

        Fails closed: whatever cannot be read (an ACL that denies XINFO, a reply of another shape, our
        own group missing) raises, and the caller skips this trim. Redis 8.2's `XTRIM … ACKED` would do
        this on the server; Redis 7 has no such option, so the floor is computed here."""
        floor = (int(time.time() * 1000) - min_age_ms, 0)
        groups = await self._groups()
        if self.group not in {decode(g["name"]) for g in groups}:
            raise StreamUnavailable(f"consumer group {self.group} not found: nothing is trimmed")
        for group in groups:
            if int(group["pending"]):
                summary = await self._call(self._redis.xpending, self.name, decode(group["name"]))
                if summary["min"] is not None:  # None: its pending list drained since XINFO
                    floor = min(floor, id_key(decode(summary["min"])))
            ms, seq = id_key(decode(group["last-delivered-id"]))
            floor = min(floor, (ms, seq + 1))
        return int(
            await self._call(self._redis.xtrim, self.name, minid=f"{floor[0]}-{floor[1]}", approximate=False)
        )


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
