"""Posts from stream fields: both message shapes, validation reasons, and arbitrary input (hypothesis)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentiment.errors import InvalidPost
from sentiment.post import Limits, Post

ENTRY = "1700000000123-0"


def parse(fields: dict[bytes, bytes], limit: int = 100_000) -> Post:
    return Post.from_fields(ENTRY, fields, Limits(content_bytes=limit))


def test_flat_and_json_shapes_give_the_same_post() -> None:
    values = {
        "post_id": "42",
        "content": "hi",
        "source": "tw",
        "author": "me",
        "created_at": "2024-01-02T03:04:05Z",
    }
    flat = parse({k.encode(): v.encode() for k, v in values.items()})
    wrapped = parse({b"data": json.dumps(values).encode()})
    assert flat == wrapped
    assert flat.created_at == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_created_at_defaults_to_the_entry_time_and_naive_means_utc() -> None:
    assert parse({b"post_id": b"1", b"content": b"x"}).created_at == datetime.fromtimestamp(
        1700000000.123, UTC
    )
    post = parse({b"post_id": b"1", b"content": b"x", b"created_at": b"2024-01-02T03:04:05"})
    assert post.created_at.tzinfo is UTC


def test_nul_is_stripped_from_text_and_rejected_in_ids() -> None:
    assert parse({b"post_id": b"1", b"content": b"a\x00b"}).content == "ab"
    with pytest.raises(InvalidPost, match="NUL"):
        parse({b"post_id": b"a\x00", b"content": b"x"})


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"content": b"x"}, "required field post_id is missing"),
        ({b"post_id": b"1"}, "required field content is missing"),
        ({b"data": b"{oops"}, "field data is not valid JSON"),
        ({b"data": b'"a string"'}, "field data must hold a JSON object, got str"),
        ({b"data": b'{"post_id": 1, "content": ["x"]}'}, "content must be a string, got list"),
        ({b"post_id": b"\xff", b"content": b"x"}, "post_id is not valid UTF-8"),
        (
            {b"post_id": b"1", b"content": b"x", b"created_at": b"yesterday"},
            "created_at is not an ISO-8601 date",
        ),
        ({b"post_id": b"   ", b"content": b"x"}, "post_id is empty"),
        ({b"post_id": b"1", b"content": b"x" * 11}, "content is 11 bytes, over the limit of 10"),
    ],
)
def test_invalid_entries_have_readable_reasons(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(InvalidPost, match=reason):
        parse(fields, limit=10)


def test_far_future_dates_and_sql_metacharacters_are_data() -> None:
    post = parse(
        {b"post_id": b"'; DROP TABLE x; --", b"content": "مرحبا 😍".encode(), b"created_at": b"9998-12-31"}
    )
    assert post.post_id == "'; DROP TABLE x; --" and post.created_at.year == 9998


values = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.one_of(
            st.sampled_from([b"post_id", b"content", b"created_at", b"data", b"author"]),
            st.binary(max_size=12),
        ),
        values,
        max_size=8,
    )
)
def test_any_flat_fields_parse_or_fail_with_a_reason(fields: dict[bytes, bytes]) -> None:
    try:
        post = parse(fields)
    except InvalidPost as exc:
        assert exc.reason and len(exc.reason) < 300
        return
    assert post.post_id.strip() and "\x00" not in post.post_id and "\x00" not in post.content


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["post_id", "content", "created_at", "source", "author", "x"]), json_values
    )
)
def test_any_json_object_parses_or_fails_with_a_reason(obj: dict[str, object]) -> None:
    try:
        parse({b"data": json.dumps(obj).encode()})
    except InvalidPost as exc:
        assert exc.reason


@pytest.mark.parametrize("field", ["content", "post_id", "author", "source"])
def test_a_lone_surrogate_in_any_text_field_is_a_reason_not_a_crash(field: str) -> None:
    data = json.dumps({"post_id": "1", "content": "ok"} | {field: "bad \ud800 text"}).encode()
    with pytest.raises(InvalidPost, match=rf"{field} holds a lone surrogate \(\\ud800\) at character 4"):
        parse({b"data": data})


def test_a_huge_json_integer_is_a_reason() -> None:
    with pytest.raises(InvalidPost, match=r"^field data cannot be parsed: Exceeds the limit \(4300 digits\)"):
        parse({b"data": b'{"post_id": ' + b"9" * 5000 + b', "content": "x"}'})


@pytest.mark.parametrize(
    ("fields", "reason"),
    [  # every value is invalid UTF-8: the bounds speak first
        ({f"f{i}".encode(): b"\xff" for i in range(5)}, "entry has 5 fields, over the limit of 4"),
        ({b"n" * 20: b"\xff"}, "entry has a field name of 20 bytes, over the limit of 16"),
        ({b"content": b"\xff" * 2000}, "entry is 2007 bytes, over the limit of 1024"),
    ],
)
def test_raw_bounds_come_before_any_decoding(fields: dict[bytes, bytes], reason: str) -> None:
    limits = Limits(entry_bytes=1024, fields=4, field_name_bytes=16)
    with pytest.raises(InvalidPost, match=f"^{reason}$"):
        Post.from_fields(ENTRY, fields, limits)


def test_an_unforeseen_error_of_one_entry_is_that_entrys_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: object) -> None:
        raise LookupError("something nobody foresaw")

    monkeypatch.setattr("sentiment.post._created_at", explode)
    with pytest.raises(
        InvalidPost, match=r"^cannot be read as a post: LookupError: something nobody foresaw$"
    ):
        parse({b"post_id": b"1", b"content": b"x"})


@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00", "1899-12-31"])
def test_a_created_at_beyond_what_can_be_read_back_is_a_reason(value: str) -> None:
    with pytest.raises(InvalidPost, match=r"^created_at is out of range \(1900 to 9998\)"):
        parse({b"post_id": b"1", b"content": b"x", b"created_at": value.encode()})
