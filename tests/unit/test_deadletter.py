"""The dead-letter layout and the replay command, on an in-memory stream."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sentiment import deadletter
from sentiment.errors import StreamUnavailable

META = {
    "reason": "invalid post: x",
    "entry_id": "5-0",
    "stream": "s",
    "group": "g",
    "deliveries": 3,
    "consumer": "c",
    "now_ms": 7,
}


@given(st.dictionaries(st.binary(min_size=1, max_size=20), st.binary(max_size=100), min_size=1, max_size=8))
def test_any_original_fields_come_back_unchanged(fields: dict[bytes, bytes]) -> None:
    encoded = deadletter.encode(fields=fields, max_bytes=65_536, **META)  # type: ignore[arg-type]
    letter = deadletter.decode("9-1", encoded)
    assert letter.original == fields
    assert (letter.reason, letter.entry_id, letter.stream, letter.deliveries) == (
        "invalid post: x",
        "5-0",
        "s",
        3,
    )
    assert not letter.truncated


def test_a_post_with_our_field_names_keeps_them() -> None:
    fields = {b"reason": b"theirs", b"dead_reason": b"theirs too", b"f:reason": b"and this", b"layout": b"9"}
    letter = deadletter.decode("9-1", deadletter.encode(fields=fields, max_bytes=65_536, **META))  # type: ignore[arg-type]
    assert letter.original == fields and letter.reason == "invalid post: x"


def test_an_oversized_entry_is_copied_in_part_and_says_so() -> None:
    fields = {b"post_id": b"1", b"content": b"x" * 100_000, b"tail": b"y"}
    encoded = deadletter.encode(fields=fields, max_bytes=2048, **META)  # type: ignore[arg-type]
    letter = deadletter.decode("9-1", encoded)
    kept = sum(len(k) + len(v) for k, v in letter.original.items())
    assert kept == 2048 and letter.original[b"post_id"] == b"1"
    assert letter.truncated == "original entry: 3 fields, 100020 bytes; this copy keeps 2 fields, 2048 bytes"


def test_a_reason_quoting_a_lone_surrogate_is_stored() -> None:
    encoded = deadletter.encode(fields={b"a": b"b"}, max_bytes=1024, **META | {"reason": "bad \ud800"})  # type: ignore[arg-type]
    assert encoded[b"reason"] == b"bad \\ud800"


def test_letters_of_the_old_layout_are_read() -> None:
    old = {
        b"post_id": b"1",
        b"content": b"x",
        b"dead_reason": b"why",
        b"dead_entry_id": b"5-0",
        b"dead_deliveries": b"6",
    }
    letter = deadletter.decode("9-1", old)
    assert letter.original == {b"post_id": b"1", b"content": b"x"}
    assert (letter.reason, letter.entry_id, letter.deliveries) == ("why", "5-0", 6)


class MemoryDead:
    def __init__(self, letters: dict[str, dict[bytes, bytes]]) -> None:
        self.letters = letters
        self.published: list[tuple[str, dict[bytes, bytes]]] = []
        self.fail_publish = False

    async def last_dead_id(self) -> str:
        return max(self.letters, default="0-0")

    async def dead_range(self, start: str, end: str, count: int) -> list[tuple[str, dict[bytes, bytes]]]:
        ids = sorted(i for i in self.letters if i <= end)
        if start.startswith("("):
            ids = [i for i in ids if i > start[1:]]
        return [(i, self.letters[i]) for i in ids[:count]]

    async def publish(self, stream: str, fields: Mapping[bytes, bytes]) -> str:
        if self.fail_publish:
            raise StreamUnavailable("down")
        self.published.append((stream, dict(fields)))
        return "1-0"

    async def remove_dead(self, ids: Sequence[str]) -> int:
        for i in ids:
            del self.letters[i]
        return len(ids)

    async def trim_dead(self, before: str) -> int:
        return 0


def _letter(reason: str, post: bytes, max_bytes: int = 65_536, **fields: bytes) -> dict[bytes, bytes]:
    original = {b"post_id": post, b"content": b"x" * 10} | {k.encode(): v for k, v in fields.items()}
    return deadletter.encode(fields=original, max_bytes=max_bytes, **META | {"reason": reason})  # type: ignore[arg-type]


async def test_replay_publishes_originals_then_removes_and_skips_partial_copies() -> None:
    store = MemoryDead(
        {
            "1-0": _letter("analysis failed 5 times: boom", b"a"),
            "2-0": _letter("invalid post: nope", b"b"),
            "3-0": _letter("analysis failed 5 times: boom", b"c", max_bytes=1024, big=b"z" * 5000),
        }
    )
    report = await deadletter.replay(store, "default", "ANALYSIS FAILED")
    assert report.as_dict() == {"replayed": 1, "skipped_truncated": 1}
    assert store.published == [("s", {b"post_id": b"a", b"content": b"x" * 10})]
    assert sorted(store.letters) == ["2-0", "3-0"]


async def test_a_failed_publish_keeps_the_letter() -> None:
    store = MemoryDead({"1-0": _letter("boom", b"a")})
    store.fail_publish = True
    with pytest.raises(StreamUnavailable):
        await deadletter.replay(store, "default")
    assert list(store.letters) == ["1-0"]


async def test_listing_pages_through_everything() -> None:
    store = MemoryDead({f"{i}-0": _letter("r", str(i).encode()) for i in range(1, 8)})
    found = [x.id async for x in deadletter.letters(store, page=3)]
    assert found == sorted(store.letters)
