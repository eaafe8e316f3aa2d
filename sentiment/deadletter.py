"""Dead letters: how a rejected entry is laid out in the dead-letter stream, and reading it back.

Layout (`layout` = 2). Our own fields have fixed names without a prefix; every field of the original
entry is stored under `f:` + its original name. No original field can therefore overwrite one of ours,
whatever it is called (a post may well carry a field named `reason` or `dead_reason`):

    layout       2
    reason       why the entry was rejected (one line)
    entry_id     the entry's ID in its stream
    stream       the stream it came from; group: the consumer group that read it
    deliveries   Redis's delivery count when it was rejected
    consumer     the worker that rejected it
    dead_at_ms   when (worker clock)
    truncated    only on copies of oversized entries: what was kept of how much (such a copy is not
                 the original and is never replayed)
    f:<name>     each original field, bytes as they were

Entries written before layout 2 (original fields beside `dead_reason`, `dead_entry_id`, …) are read too.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from typing import Protocol

import attrs

from .post import Measured, entry_bytes

LAYOUT = b"2"
FIELD_PREFIX = b"f:"
_LEGACY = (
    b"dead_reason",
    b"dead_entry_id",
    b"dead_stream",
    b"dead_group",
    b"dead_deliveries",
    b"dead_consumer",
    b"dead_at_ms",
)


@attrs.frozen
class DeadEntry:
    """A dead-letter entry read back: where it came from, why, and the original fields."""

    id: str
    reason: str
    entry_id: str
    stream: str
    group: str
    deliveries: int
    consumer: str
    dead_at_ms: int
    original: Mapping[bytes, bytes]
    truncated: str = ""

    def post_id(self) -> str:
        """The post_id as far as it can be told without parsing JSON (for listings)."""
        raw = self.original.get(b"post_id", b"")
        if not raw and b"data" in self.original:
            return "(in data)"
        return raw.decode("utf-8", "replace")[:64]

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "reason": self.reason,
            "entry_id": self.entry_id,
            "stream": self.stream,
            "group": self.group,
            "deliveries": self.deliveries,
            "consumer": self.consumer,
            "dead_at_ms": self.dead_at_ms,
            "post_id": self.post_id(),
            "fields": {
                k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace")[:200]
                for k, v in self.original.items()
            },
            "truncated": self.truncated,
        }


def _text(value: str) -> bytes:
    # A reason may quote the hostile text it rejects (a lone surrogate, say): never fail on encoding it.
    return value.encode("utf-8", "backslashreplace")


def encode(
    *,
    fields: Mapping[bytes, bytes],
    reason: str,
    entry_id: str,
    stream: str,
    group: str,
    deliveries: int,
    consumer: str,
    now_ms: int,
    max_bytes: int | None,
    measured: Measured | None = None,
) -> dict[bytes, bytes]:
    """The dead-letter entry for one rejected entry; an entry over `max_bytes` is copied in part (None:
    copied whole)."""
    out = {
        b"layout": LAYOUT,
        b"reason": _text(reason),
        b"entry_id": _text(entry_id),
        b"stream": _text(stream),
        b"group": _text(group),
        b"deliveries": str(deliveries).encode(),
        b"consumer": _text(consumer),
        b"dead_at_ms": str(now_ms).encode(),
    }
    if measured is not None:  # already cut to size in Redis (stream.peek_oversized)
        out.update({FIELD_PREFIX + k: v for k, v in fields.items()})
        out[b"truncated"] = (
            f"original entry: {measured.fields} fields, {measured.bytes} bytes, measured in Redis (too "
            f"large to read); this copy keeps {len(fields)} fields, {entry_bytes(fields)} bytes"
        ).encode()
        return out
    total = entry_bytes(fields)
    if max_bytes is None or total <= max_bytes:
        out.update({FIELD_PREFIX + k: v for k, v in fields.items()})
        return out
    # An oversized entry is kept only in part, so a flood of huge entries cannot double Redis's memory.
    budget, kept = max_bytes, 0
    for name, value in fields.items():
        if len(name) > min(budget, 1024):
            break
        part = value[: budget - len(name)]
        out[FIELD_PREFIX + name] = part
        budget -= len(name) + len(part)
        kept += 1
        if budget <= 0:
            break
    out[b"truncated"] = (
        f"original entry: {len(fields)} fields, {total} bytes; this copy keeps {kept} fields, "
        f"{max_bytes - budget} bytes"
    ).encode()
    return out


def decode(dead_id: str, fields: Mapping[bytes, bytes]) -> DeadEntry:
    def text(name: bytes) -> str:
        return fields.get(name, b"").decode("utf-8", "replace")

    def number(name: bytes) -> int:
        try:
            return int(fields.get(name, b"0"))
        except ValueError:
            return 0

    if fields.get(b"layout") == LAYOUT:
        original = {k[len(FIELD_PREFIX) :]: v for k, v in fields.items() if k.startswith(FIELD_PREFIX)}
        return DeadEntry(
            dead_id,
            text(b"reason"),
            text(b"entry_id"),
            text(b"stream"),
            text(b"group"),
            number(b"deliveries"),
            text(b"consumer"),
            number(b"dead_at_ms"),
            original,
            text(b"truncated"),
        )
    return DeadEntry(
        dead_id,
        text(b"dead_reason"),
        text(b"dead_entry_id"),
        text(b"dead_stream"),
        text(b"dead_group"),
        number(b"dead_deliveries"),
        text(b"dead_consumer"),
        number(b"dead_at_ms"),
        {k: v for k, v in fields.items() if k not in _LEGACY},
    )


# -- the operator's commands: `python -m sentiment deadletter list|replay|purge` ---------------------------


class DeadLetterStream(Protocol):
    """What the commands need of the stream (RedisStream implements it)."""

    async def last_dead_id(self) -> str: ...
    async def dead_range(self, start: str, end: str, count: int) -> list[tuple[str, dict[bytes, bytes]]]: ...
    async def publish(self, stream: str, fields: Mapping[bytes, bytes]) -> str: ...
    async def remove_dead(self, ids: Sequence[str]) -> int: ...
    async def trim_dead(self, before: str) -> int: ...


async def letters(
    stream: DeadLetterStream, reason: str = "", page: int = 500
) -> AsyncGenerator[DeadEntry, None]:
    """Every dead letter there is now, oldest first; with `reason`, those whose reason contains it (any
    case). Letters added meanwhile are left out: a replay whose posts running workers dead-letter again
    must end, not chase its own tail."""
    start, end = "-", await stream.last_dead_id()
    while True:
        rows = await stream.dead_range(start, end, page)
        for dead_id, fields in rows:
            entry = decode(dead_id, fields)
            if reason.lower() in entry.reason.lower():
                yield entry
        if len(rows) < page:
            return
        start = f"({rows[-1][0]}"


@attrs.frozen
class ReplayReport:
    replayed: int = 0
    skipped_truncated: int = 0

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


async def replay(
    stream: DeadLetterStream, default_stream: str, reason: str = "", *, dry_run: bool = False
) -> ReplayReport:
    """Publish each matching letter's original fields to the stream it came from again, then remove the
    letter: only after the XADD succeeded, so a failure in between leaves a copy in both (a post written
    twice is absorbed by the store: one post, one analysis) and never in neither."""
    replayed = skipped = 0
    async with aclosing(letters(stream, reason)) as found:
        async for entry in found:
            if entry.truncated or not entry.original:
                skipped += 1  # a partial copy is not the post: replaying it would publish another one
                continue
            replayed += 1
            if not dry_run:
                await stream.publish(entry.stream or default_stream, entry.original)
                await stream.remove_dead([entry.id])
    return ReplayReport(replayed, skipped)
