"""What the pipeline passes around — stream entries, claims, pending entries, dead letters — and the
Stream protocol it reads them through (RedisStream in stream.py; the tests' in-memory fake)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Protocol

import attrs

from .post import Measured
from .redact import one_line


@attrs.frozen
class Entry:
    id: str
    fields: Mapping[bytes, bytes]
    deliveries: int = 1
    # Set on an entry over the raw bounds measured in Redis without reading it (see peek_oversized):
    # `fields` then holds only its first bytes.
    measured: Measured | None = None


# What one batch may hold in bytes, about: the next read takes as many entries as fit, at the size of the
# last read's. Normal posts (up to a few KB) fill BATCH_SIZE; near-limit ones (100 KB of content) take
# about 80 at a time, and entries at MAX_ENTRY_BYTES 8, so the up to six batches held at once stay within
# about 50 MB whatever the producers send, after the first read of them.
BATCH_BYTES = 8_000_000


def read_count(entries: Sequence[Entry], batch_size: int) -> int:
    """How many entries the next read takes, after reading `entries` (at least 1, at most batch_size)."""
    if not entries:
        return batch_size
    # The values' bytes (names are bounded small by MAX_FIELD_NAME_BYTES), summed in C: this runs on
    # every read, on the main thread.
    average = sum(map(len, chain.from_iterable(e.fields.values() for e in entries))) / len(entries)
    return max(1, min(batch_size, int(BATCH_BYTES // max(average, 1.0))))


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
    # A valid post (its analysis or its row failed): copied whole, whatever DEAD_LETTER_MAX_BYTES says,
    # so that a replay after the fix brings it back. Its size is bounded by MAX_ENTRY_BYTES already.
    whole: bool = False


class Stream(Protocol):
    """What the pipeline needs from a stream; RedisStream and the tests' in-memory fake implement it."""

    async def ping(self) -> bool: ...
    async def ensure_group(self) -> None: ...
    async def check_keys(self) -> None: ...
    async def read(self, start: str, count: int, block_ms: int | None) -> tuple[list[Entry], list[str]]: ...
    async def autoclaim(self, cursor: str, min_idle_ms: int, count: int) -> Claimed: ...
    async def claim(self, ids: Sequence[str], min_idle_ms: int) -> list[str]: ...
    async def peek_oversized(self, entry_id: str) -> Entry | None: ...
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
    async def group_info(self, count_up_to: int = 0) -> dict[str, int]: ...
    async def trim_acked(self, min_age_ms: int) -> int: ...
    async def remove_idle_consumers(self, min_idle_ms: int) -> list[str]: ...


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str:
    """The smallest stream ID after `entry_id` (an inclusive start that skips it)."""
    ms, seq = id_key(entry_id)
    return f"{ms}-{seq + 1}"
