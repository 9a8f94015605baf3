"""Unit tests of the relay's wire format: ids, validation, envelope, SSE frames."""

from __future__ import annotations

import json

import pytest

from coordinator.errors import EventTooLargeError, InvalidEventError, InvalidEventIdError
from coordinator.relay.events import (
    EventId,
    check_channel,
    decode_envelope,
    encode_envelope,
    parse_event_id,
    parse_publish_body,
    reset_frame,
    retry_frame,
    sse_frame,
    validate_event,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1700000000000-0", EventId(1700000000000, 0)),
        ("0-0", EventId(0, 0)),
        (" 5-7 ", EventId(5, 7)),
        (b"12-3", EventId(12, 3)),
    ],
)
def test_parse_event_id(text: str, expected: EventId) -> None:
    assert parse_event_id(text) == expected
    assert str(expected) == f"{expected.ms}-{expected.seq}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "1-2-3",
        "-1-0",
        "1",
        "1-",
        "-1",
        "1.5-0",
        "\uff11-0",
        "18446744073709551616-0",
        "1-18446744073709551616",
        "1-0\n2",
        "x" * 10_000,
        "1-0; DROP",
    ],
)
def test_parse_event_id_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidEventIdError) as info:
        parse_event_id(text)
    assert "ids look like" in str(info.value)
    assert len(str(info.value)) < 200  # a huge header is not echoed whole


def test_ids_compare_numerically_not_as_text() -> None:
    assert parse_event_id("10-0") > parse_event_id("9-99")
    assert parse_event_id("5-10") > parse_event_id("5-9")


@pytest.mark.parametrize("channel", ["a", "room:42", "A.b_c-d", "9" * 128])
def test_valid_channels(channel: str) -> None:
    assert check_channel(channel) == channel


@pytest.mark.parametrize("channel", ["", "-a", "a b", "a/b", "é", "a\nb", "9" * 129, None, 5])
def test_invalid_channels(channel: object) -> None:
    with pytest.raises(InvalidEventError, match="use 1-128 characters") as direct:
        check_channel(channel)
    with pytest.raises(InvalidEventError) as publishing:
        validate_event(channel, {}, "message", 1000)  # type: ignore[arg-type]
    assert str(publishing.value) == str(direct.value)  # one rule, one message


def test_validate_event_encodes_compact_json_once() -> None:
    encoded = validate_event("news", {"a": [1, 2], "t": "line\nbreak é"}, "update", 1000)
    assert encoded.data_json == '{"a":[1,2],"t":"line\\nbreak é"}'
    assert "\n" not in encoded.data_json  # one SSE data line, always


@pytest.mark.parametrize(
    ("data", "event", "match"),
    [
        ({1, 2}, "message", "JSON"),
        (float("nan"), "message", "JSON"),
        (object(), "message", "JSON"),
        (1, "bad name", "event name"),
        (1, "", "event name"),
        (1, "reset", "reserved"),
        (1, "a\nb", "event name"),
    ],
)
def test_validate_event_rejects(data: object, event: str, match: str) -> None:
    with pytest.raises(InvalidEventError, match=match):
        validate_event("news", data, event, 1000)


def test_validate_event_size_limit() -> None:
    validate_event("news", "x" * 90, "message", 99)  # 92 + 7 bytes: at the limit
    with pytest.raises(EventTooLargeError) as info:
        validate_event("news", "x" * 91, "message", 99)
    assert (info.value.size, info.value.limit) == (100, 99)
    assert "COORDINATOR_RELAY_MAX_EVENT_BYTES" in str(info.value)


def test_publish_body() -> None:
    assert parse_publish_body({"data": None}).event == "message"
    assert parse_publish_body({"event": "tick", "data": [1]}).data == [1]
    for bad in [[], "x", {"event": "tick"}, {"data": 1, "extra": 2}, {"event": 3, "data": 1}]:
        with pytest.raises(InvalidEventError, match="body"):
            parse_publish_body(bad)


def test_envelope_round_trip() -> None:
    raw = encode_envelope("room:1", "17-3", "tick", '{"x":"a\\nb"}')
    envelope = decode_envelope(raw)
    assert envelope.channel == "room:1"
    assert envelope.id == EventId(17, 3)
    assert (envelope.event, envelope.data) == (b"tick", b'{"x":"a\\nb"}')


@pytest.mark.parametrize("raw", [b"", b"2\nc\n1-0\ne\n{}", b"1\nc\nnot-an-id\ne\n{}", b"1\nc\n1-0"])
def test_envelope_rejects_foreign_messages(raw: bytes) -> None:
    with pytest.raises(InvalidEventError):
        decode_envelope(raw)


def test_frames() -> None:
    assert sse_frame(b"1-0", b"tick", b"{}") == b"id: 1-0\nevent: tick\ndata: {}\n\n"
    assert retry_frame(1500) == b"retry: 1500\n\n"
    reset = reset_frame(EventId(3, 1), "trimmed")
    assert reset.startswith(b"event: reset\ndata: ") and b"id:" not in reset
    assert json.loads(reset.split(b"data: ")[1]) == {"reason": "trimmed", "last_event_id": "3-1"}
