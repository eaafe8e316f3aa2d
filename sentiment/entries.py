"""What the pipeline passes around — stream entries, claims, pending entries, dead letters — and the
Stream protocol it reads them through (RedisStream in stream.py; the tests' in-memory fake)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Protocol

import attrs

from .post import Measured, entry_bytes
from .redact import one_line


@attrs.frozen
class Entry:
    id: str
    fields: Mapping[bytes, bytes]
    deliveries: int = 1
    # Set on an entry over the raw bounds measured in Redis without reading it (see peek_oversized):
    # `fields` then holds only its first bytes.
    measured: Measured | None = None

    @cached_property
    def raw_bytes(self) -> int:
        """Its names and values in bytes: counted once, for the read budget and for the raw bounds."""
        return entry_bytes(self.fields)


# What one batch may hold, about, in bytes: each read takes as many entries as fit at the size of the
# largest of the last read's (normal posts of a few KB fill BATCH_SIZE, posts of 100 KB of content about 80,
# entries at MAX_ENTRY_BYTES 8), and what a read brings is handed on in batches of at most this much.
BATCH_BYTES = 8_000_000
# What Python holds per field beyond its name and value (two bytes objects and a dict slot): an entry of
# 200,000 one-byte fields takes 18 MB, not 400 KB.
FIELD_OVERHEAD_BYTES = 100


def entry_size(entry: Entry) -> int:
    """An estimate of the memory an entry read from Redis takes: names, values and their overhead."""
    return entry.raw_bytes + FIELD_OVERHEAD_BYTES * len(entry.fields)


def read_count(sizes: Sequence[int], batch_size: int, previous: int) -> int:
    """How many entries the next read takes, after one whose entries had these `sizes`: as many as fit
    in BATCH_BYTES at the largest of them; down at once, up at most twice `previous` per read, so that a
    few small entries between large ones do not open the next read to BATCH_SIZE large ones."""
    if not sizes:
        return min(batch_size, 2 * previous)
    fit = BATCH_BYTES // max(max(sizes), 1)
    return max(1, min(batch_size, fit, 2 * previous))


def by_bytes(entries: Sequence[Entry], sizes: Sequence[int]) -> list[list[Entry]]:
    """The entries in order, in batches of at most BATCH_BYTES (one entry at least)."""
    batches: list[list[Entry]] = []
    total = 0
    for entry, size in zip(entries, sizes, strict=True):
        if not batches or total + size > BATCH_BYTES:
            batches.append([])
            total = 0
        batches[-1].append(entry)
        total += size
    return batches


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


MAX_ID_PART = 2**64 - 1  # each half of a stream ID is an unsigned 64-bit number
LARGEST_ID = f"{MAX_ID_PART}-{MAX_ID_PART}"


def next_id(entry_id: str) -> str | None:
    """The smallest stream ID after `entry_id` (an inclusive start that skips it); None after the
    largest ID there is, which a producer may XADD and a group may be set to."""
    ms, seq = id_key(entry_id)
    if seq < MAX_ID_PART:
        return f"{ms}-{seq + 1}"
    return f"{ms + 1}-0" if ms < MAX_ID_PART else None
