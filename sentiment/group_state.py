"""The state of a stream's consumer groups, read with XINFO, and what is done from it: the backlog and
pending figures (monitor, stats, the summary line), retention (XTRIM MINID below what every group still
owes) and removing idle consumers. A base of RedisStream (stream.py), which supplies `_call`: the commands
go through its client, with its error mapping."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.exceptions as rex

from .consumers import REMOVE_IDLE
from .entries import LARGEST_ID, id_key, next_id
from .errors import StreamUnavailable
from .redis_client import decode, no_such_key

T = TypeVar("T")
# Entries past the group's position counted on every reading, to give the backlog exactly where a lag
# off by hundreds misleads most (an idle or lightly loaded stream); about a millisecond of Redis.
CHECK_UP_TO = 256
COUNT_STEP = 1000  # entries one script counts: a few milliseconds of Redis at a time
# Count the entries of KEYS[1] from ID ARGV[1] on, at most ARGV[2], one XRANGE step each so that Redis
# holds one entry's copy at a time; returns the count and the last ID counted.
_COUNT_PAST = """
local start, limit, n, last = ARGV[1], tonumber(ARGV[2]), 0, ''
while n < limit do
  local found = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1)
  if #found == 0 then break end
  n, last = n + 1, found[1][1]
  start = '(' .. last
  if last == 'LARGEST_ID' then break end
end
return {n, last}
""".replace("LARGEST_ID", LARGEST_ID)


class GroupState:
    name: str
    group: str
    consumer: str
    _redis: Any

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        raise NotImplementedError  # RedisStream's

    async def _groups(self) -> list[dict[str, Any]]:
        try:
            groups: list[dict[str, Any]] = await self._call(self._redis.xinfo_groups, self.name)
        except rex.ResponseError as exc:
            if no_such_key(exc):  # the stream does not exist yet
                return []
            raise
        return groups

    async def group_info(self, count_up_to: int = 0) -> dict[str, int]:
        """Our group's pending count, its lag as XINFO GROUPS reports it (-1: Redis cannot tell, after
        XDEL or trims: redis issue 13337), and its backlog: the entries not yet delivered to it.

        The backlog is counted past the group's last-delivered ID where there are at most `CHECK_UP_TO`
        such entries, whatever the lag says: Redis 7.0 keeps a lag of hundreds too high after failovers
        and slot migrations (and after an XTRIM of undelivered entries), for good, and can say 0 with
        entries waiting. Past that, the lag where it is at least the count; else (unknown, or shown too
        low) counted up to `count_up_to` (0: not counted, -1)."""
        last, lag, pending = "0-0", None, 0
        for group in await self._groups():
            if decode(group["name"]) == self.group:
                last, lag, pending = (
                    decode(group["last-delivered-id"]),
                    group.get("lag"),
                    int(group["pending"]),
                )
                break
        said = -1 if lag is None else int(lag)
        try:
            seen, after = await self._count_past(next_id(last), CHECK_UP_TO + 1)
            if seen <= CHECK_UP_TO:
                backlog = seen  # every one counted
            elif said >= seen:
                backlog = said
            elif count_up_to > seen:
                backlog = seen + (await self._count_past(after, count_up_to - seen))[0]
            else:
                backlog = seen if count_up_to else -1  # at least `seen`: enough for "is anything left?"
        except StreamUnavailable as exc:
            if not isinstance(exc.__cause__, rex.NoPermissionError):
                raise
            backlog = said  # an ACL without EVAL: Redis's lag, as it is
        return {"lag": said, "backlog": backlog, "pending": pending}

    async def _count_past(self, start: str | None, limit: int) -> tuple[int, str | None]:
        """The entries from ID `start` on (None: past the largest ID, nothing), counted inside Redis up to
        `limit`, and where a further count would start: an undelivered entry may be far too large to
        fetch (see RedisStream.peek_oversized), and only the count is wanted."""
        counted = 0
        while start is not None and counted < limit:
            step = min(limit - counted, COUNT_STEP)
            reply: Any = await self._call(self._redis.eval, _COUNT_PAST, 1, self.name, start, step)
            counted += int(reply[0])
            if int(reply[0]) < step:
                return counted, None  # the end of the stream
            start = next_id(decode(reply[1]))
        return counted, start

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
