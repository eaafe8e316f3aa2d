"""The stream source: a Redis Stream read through a consumer group.

redis-py has no trio support, so `redis.asyncio` runs on a trio-asyncio loop (opened once by the caller)
and each command crosses over with `aio_as_trio`. Driver errors become StreamUnavailable here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import attrs
import redis.asyncio as aioredis
import redis.exceptions as rex
import trio_asyncio

from .config import Settings, mask_url
from .errors import ConfigError, StreamUnavailable

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
    reason: str


class Stream(Protocol):
    """What the pipeline needs from a stream; RedisStream and the tests' in-memory fake implement it."""

    async def ensure_group(self) -> None: ...
    async def read(self, start: str, count: int, block_ms: int | None) -> tuple[list[Entry], list[str]]: ...
    async def autoclaim(self, cursor: str, min_idle_ms: int, count: int) -> Claimed: ...
    async def with_deliveries(self, entries: Sequence[Entry]) -> list[Entry]: ...
    async def ack(self, ids: Sequence[str]) -> None: ...
    async def dead_letter(self, letters: Sequence[DeadLetter], consumer: str) -> None: ...
    async def renew(self, ids: Sequence[str]) -> None: ...
    async def pending(
        self, count: int, consumer: str | None = None, idle_ms: int | None = None
    ) -> list[PendingEntry]: ...
    async def pending_count(self) -> int: ...
    async def group_info(self) -> dict[str, int]: ...
    async def trim_acked(self, min_age_ms: int) -> int: ...


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStream:
    """Stream on Redis. Open it with `RedisStream.open(settings)` inside `trio_asyncio.open_loop()`."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._redis = client
        self.settings = settings
        self.name = settings.stream
        self.group = settings.group
        self.consumer = settings.consumer

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[RedisStream]:
        try:
            client = aioredis.Redis.from_url(
                settings.redis_url,
                decode_responses=False,  # entries may hold bytes that are not UTF-8: Post decides
                socket_connect_timeout=5,
                socket_timeout=settings.block_ms / 1000 + 10,  # longer than any XREADGROUP BLOCK
                health_check_interval=30,
            )
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL is not usable ({mask_url(settings.redis_url)}): {exc}") from None
        try:
            yield cls(client, settings)
        finally:
            await trio_asyncio.aio_as_trio(client.aclose)()

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        try:
            result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
            return result
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise StreamUnavailable(f"Redis at {mask_url(self.settings.redis_url)}: {exc}") from exc
        except rex.ResponseError as exc:
            message = str(exc)
            if message.startswith("NOGROUP"):
                # Redis restarted without persistence, or someone deleted the key: build it again.
                await self.ensure_group()
                raise StreamUnavailable(
                    f"consumer group {self.group} was missing and has been recreated"
                ) from exc
            if message.startswith(("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN")):
                raise StreamUnavailable(f"Redis is busy: {message}") from exc
            raise

    async def ping(self) -> bool:
        await self._call(self._redis.ping)
        return True

    async def ensure_group(self) -> None:
        # From ID 0, not `$`: posts published before the first worker started are not skipped.
        try:
            await trio_asyncio.aio_as_trio(self._redis.xgroup_create)(
                self.name, self.group, id="0", mkstream=True
            )
        except rex.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise StreamUnavailable(f"Redis at {mask_url(self.settings.redis_url)}: {exc}") from exc

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
                    entries.append(Entry(_decode(entry_id), fields))
                    if fields
                    else deleted.append(_decode(entry_id))
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
        deleted = tuple(_decode(x) for x in reply[2]) if len(reply) > 2 else ()
        entries = [Entry(_decode(i), f) for i, f in items if i is not None and f]
        return Claimed(_decode(next_cursor), tuple(await self.with_deliveries(entries)), deleted)

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
        counts = {_decode(r["message_id"]): int(r["times_delivered"]) for r in rows}
        return [attrs.evolve(e, deliveries=counts.get(e.id, e.deliveries)) for e in entries]

    async def ack(self, ids: Sequence[str]) -> None:
        if ids:
            await self._call(self._redis.xack, self.name, self.group, *ids)

    async def dead_letter(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        """Copy each entry with its reason to the dead-letter stream and ack it, atomically (MULTI)."""
        if not letters:
            return
        pipe = self._redis.pipeline(transaction=True)
        now = str(int(time.time() * 1000)).encode()
        for letter in letters:
            fields: dict[Any, Any] = dict(letter.entry.fields)
            fields.update(
                {
                    b"dead_reason": letter.reason.encode(),
                    b"dead_entry_id": letter.entry.id.encode(),
                    b"dead_stream": self.name.encode(),
                    b"dead_group": self.group.encode(),
                    b"dead_deliveries": str(letter.entry.deliveries).encode(),
                    b"dead_consumer": consumer.encode(),
                    b"dead_at_ms": now,
                }
            )
            pipe.xadd(self.settings.dead_letter, fields)
            pipe.xack(self.name, self.group, letter.entry.id)
        await self._call(pipe.execute)

    async def renew(self, ids: Sequence[str]) -> None:
        """XCLAIM our own in-flight entries with JUSTID: resets their idle time, not their delivery count."""
        if ids:
            await self._call(
                self._redis.xclaim, self.name, self.group, self.consumer, 0, list(ids), justid=True
            )

    async def pending(
        self, count: int, consumer: str | None = None, idle_ms: int | None = None
    ) -> list[PendingEntry]:
        rows = await self._call(
            self._redis.xpending_range,
            self.name,
            self.group,
            min="-",
            max="+",
            count=count,
            consumername=consumer,
            idle=idle_ms,
        )
        return [
            PendingEntry(
                _decode(r["message_id"]),
                _decode(r["consumer"]),
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
        except rex.ResponseError:  # "no such key": the stream does not exist yet
            return []
        return groups

    async def group_info(self) -> dict[str, int]:
        """Our group's lag (entries not yet delivered to it) and pending count (XINFO GROUPS)."""
        for group in await self._groups():
            if _decode(group["name"]) == self.group:
                lag = group.get("lag")
                return {"lag": int(lag) if lag is not None else -1, "pending": int(group["pending"])}
        return {"lag": -1, "pending": 0}

    async def info(self) -> dict[str, Any]:
        """What `sentiment stats` shows: stream length, groups with consumers, dead-letter length."""
        length = int(await self._call(self._redis.xlen, self.name))
        groups = []
        for g in await self._groups():
            name = _decode(g["name"])
            consumers = await self._call(self._redis.xinfo_consumers, self.name, name)
            groups.append(
                {
                    "name": name,
                    "pending": int(g["pending"]),
                    "lag": g.get("lag"),
                    "last_delivered_id": _decode(g["last-delivered-id"]),
                    "consumers": [
                        {"name": _decode(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"])}
                        for c in consumers
                    ],
                }
            )
        dead = int(await self._call(self._redis.xlen, self.settings.dead_letter))
        return {
            "stream": self.name,
            "length": length,
            "groups": groups,
            "dead_letter": {"stream": self.settings.dead_letter, "length": dead},
        }

    async def trim_acked(self, min_age_ms: int) -> int:
        """Trim entries older than `min_age_ms` that every group has read and acked (XTRIM MINID): the
        floor is the oldest pending ID of any group and the first ID after any group's last delivered one,
        so retention never drops work a group still owes."""
        floor = (int(time.time() * 1000) - min_age_ms, 0)
        for group in await self._groups():
            if int(group.get("pending", 0)):
                summary = await self._call(self._redis.xpending, self.name, _decode(group["name"]))
                floor = min(floor, id_key(_decode(summary["min"])))
            ms, seq = id_key(_decode(group["last-delivered-id"]))
            floor = min(floor, (ms, seq + 1))
        return int(
            await self._call(self._redis.xtrim, self.name, minid=f"{floor[0]}-{floor[1]}", approximate=False)
        )


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
