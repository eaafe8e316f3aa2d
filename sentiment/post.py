"""Posts as they arrive on the stream: parsed and validated, or rejected with a reason for the dead-letter."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

from .errors import InvalidPost

MAX_ID_CHARS = 256
MAX_META_CHARS = 1000
MIN_YEAR, MAX_YEAR = 1900, 9998  # created_at, in UTC
MAX_REASON_CHARS = 300  # an unforeseen error's text, as it goes into the dead-letter reason


@attrs.frozen
class Limits:
    """Bounds on what one entry may hold. The raw ones are checked before anything is decoded."""

    content_bytes: int = 100_000
    entry_bytes: int = 1_000_000
    fields: int = 64
    field_name_bytes: int = 256

    def check_raw(self, fields: Mapping[bytes, bytes], size: int | None = None) -> None:
        """InvalidPost if the entry is too large to be worth decoding: total bytes (`size` when the caller
        counted them already: `Entry.raw_bytes`), field count, names."""
        if len(fields) > self.fields:
            raise InvalidPost(f"entry has {len(fields)} fields, over the limit of {self.fields}")
        longest = max(map(len, fields), default=0)
        if longest > self.field_name_bytes:
            raise InvalidPost(
                f"entry has a field name of {longest} bytes, over the limit of {self.field_name_bytes}"
            )
        size = entry_bytes(fields) if size is None else size
        if size > self.entry_bytes:
            raise InvalidPost(f"entry is {size} bytes, over the limit of {self.entry_bytes}")

    def measured_reason(self, measured: Measured) -> str:
        return (
            f"entry is {measured.bytes} bytes in {measured.fields} fields, over the limits of "
            f"{self.entry_bytes} bytes and {self.fields} fields (measured in Redis: too large to read)"
        )


@attrs.frozen
class Measured:
    """What Redis measured of an entry too large to read: its bytes (names and values) and fields."""

    bytes: int
    fields: int


def entry_bytes(fields: Mapping[bytes, bytes]) -> int:
    return sum(map(len, fields)) + sum(map(len, fields.values()))


def entry_time(entry_id: str) -> datetime:
    """The time Redis gave the entry: the millisecond part of its ID."""
    millis = int(entry_id.split("-", 1)[0])
    return datetime.fromtimestamp(millis / 1000, tz=UTC)


@attrs.frozen
class Post:
    entry_id: str
    post_id: str
    content: str
    source: str
    author: str
    created_at: datetime

    @classmethod
    def from_fields(
        cls, entry_id: str, fields: Mapping[bytes, bytes], limits: Limits, size: int | None = None
    ) -> Post:
        """Accept the seed's flat fields or one `data` field holding that JSON object; else InvalidPost.
        `size`: the entry's bytes, if counted already (`Limits.check_raw`).

        Whatever a producer put in the entry, the only exception that leaves here is InvalidPost: an error
        we did not foresee while reading one entry is that entry's fault, never the worker's."""
        limits.check_raw(fields, size)
        try:
            return cls._parse(entry_id, fields, limits.content_bytes)
        except InvalidPost:
            raise
        except Exception as exc:
            reason = f"cannot be read as a post: {type(exc).__name__}: {exc}"
            raise InvalidPost(reason[:MAX_REASON_CHARS]) from None

    @classmethod
    def _parse(cls, entry_id: str, fields: Mapping[bytes, bytes], max_content_bytes: int) -> Post:
        if b"data" in fields:
            raw = _utf8(fields[b"data"], "data")
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InvalidPost(f"field data is not valid JSON: {exc.msg} at position {exc.pos}") from None
            except ValueError as exc:  # e.g. an integer of more than 4,300 digits
                reason = str(exc).split(";")[0]  # not the hint that follows for Python programmers
                raise InvalidPost(f"field data cannot be parsed: {reason}"[:MAX_REASON_CHARS]) from None
            except RecursionError:
                raise InvalidPost("field data is nested too deeply") from None
            if not isinstance(obj, dict):
                raise InvalidPost(f"field data must hold a JSON object, got {type(obj).__name__}")
            values: dict[str, Any] = obj
        else:
            try:
                values = {k.decode(): v.decode() for k, v in fields.items()}
            except UnicodeDecodeError:
                for k, v in fields.items():  # which field: for the reason
                    _utf8(v, _utf8(k, "a field name"))
                raise

        content, size = _text_and_size(values, "content", required=True)
        if size > max_content_bytes:
            raise InvalidPost(f"content is {size} bytes, over the limit of {max_content_bytes}")
        post_id = _text(values, "post_id", required=True)
        if not post_id.strip():
            raise InvalidPost("post_id is empty")
        if len(post_id) > MAX_ID_CHARS:
            raise InvalidPost(f"post_id is {len(post_id)} characters, over the limit of {MAX_ID_CHARS}")
        if "\x00" in post_id:
            raise InvalidPost("post_id contains a NUL character")
        return cls(
            entry_id=entry_id,
            post_id=post_id,
            # PostgreSQL text cannot hold NUL; it carries no meaning in a post, so it is dropped.
            content=content.replace("\x00", ""),
            source=_meta(values, "source"),
            author=_meta(values, "author"),
            created_at=_created_at(values.get("created_at"), entry_id),
        )


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPost(f"{what} is not valid UTF-8 (byte {exc.start})") from None


def _text(values: Mapping[str, Any], name: str, *, required: bool) -> str:
    return _text_and_size(values, name, required=required)[0]


def _text_and_size(values: Mapping[str, Any], name: str, *, required: bool) -> tuple[str, int]:
    """The field as text and its size in UTF-8 bytes (encoded once: it is how lone surrogates show)."""
    value = values.get(name)
    if value is None:
        if required:
            raise InvalidPost(f"required field {name} is missing")
        return "", 0
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidPost(f"{name} must be a string, got {type(value).__name__}")
    text = str(value)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        # JSON may spell a lone surrogate ("\ud800"); no UTF-8 text, and so no database, can hold it.
        raise InvalidPost(
            f"{name} holds a lone surrogate (\\u{ord(text[exc.start]):04x}) at character {exc.start}"
        ) from None
    return text, size


def _meta(values: Mapping[str, Any], name: str) -> str:
    value = _text(values, name, required=False).replace("\x00", "")
    if len(value) > MAX_META_CHARS:
        raise InvalidPost(f"{name} is {len(value)} characters, over the limit of {MAX_META_CHARS}")
    return value


def _created_at(value: Any, entry_id: str) -> datetime:
    if value is None or value == "":
        # A producer may choose the entry ID: the same range applies to its time.
        return _readable(entry_time(entry_id), "created_at is missing and the entry ID's time", entry_id)
    if not isinstance(value, str):
        raise InvalidPost(f"created_at must be an ISO-8601 string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidPost(f"created_at is not an ISO-8601 date: {value[:64]!r}") from None
    try:
        utc = parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except OverflowError:
        utc = None
    return _readable(utc, "created_at", repr(value[:64]))


def _readable(when: datetime | None, what: str, given: str) -> datetime:
    """Stored in UTC and read back by Python: both ends must stay within what a datetime can hold."""
    if when is None or not MIN_YEAR <= when.year <= MAX_YEAR:
        raise InvalidPost(f"{what} is out of range ({MIN_YEAR} to {MAX_YEAR}): {given}")
    return when
