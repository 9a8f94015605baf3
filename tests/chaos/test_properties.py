"""Property tests (hypothesis) of the wire format in coordinator/events.py: whatever the
input, the parsers either return a consistent value or raise the library's own error,
never anything else. Pure and fast; not marked ``chaos``."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.errors import EventTooLargeError, InvalidEventError, InvalidEventIdError
from coordinator.relay.events import (
    EventId,
    decode_envelope,
    encode_envelope,
    parse_event_id,
    parse_publish_body,
    validate_event,
)

U64 = st.integers(min_value=0, max_value=2**64 - 1)
CHANNEL = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", fullmatch=True)
EVENT = st.from_regex(r"[A-Za-z][A-Za-z0-9._:-]{0,63}", fullmatch=True).filter(
    lambda e: e != "reset"
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(U64, U64)
def test_event_ids_round_trip_and_order(ms: int, seq: int) -> None:
    parsed = parse_event_id(f"{ms}-{seq}")
    assert parsed == EventId(ms, seq) and str(parsed) == f"{ms}-{seq}"
    assert parse_event_id(str(parsed).encode()) == parsed


@given(st.one_of(st.text(max_size=60), st.binary(max_size=60)))
@settings(max_examples=500)
def test_any_last_event_id_parses_or_raises_the_library_error(value: str | bytes) -> None:
    try:
        parsed = parse_event_id(value)
    except InvalidEventIdError:
        return
    assert 0 <= parsed.ms < 2**64 and 0 <= parsed.seq < 2**64


@given(st.integers(min_value=2**64, max_value=2**80), U64)
def test_ids_beyond_64_bits_are_refused(ms: int, seq: int) -> None:
    for text in (f"{ms}-{seq}", f"{seq}-{ms}"):
        try:
            parse_event_id(text)
        except InvalidEventIdError:
            continue
        raise AssertionError(f"{text} accepted")


@given(CHANNEL, U64, U64, EVENT, JSON)
def test_envelopes_round_trip(channel: str, ms: int, seq: int, event: str, data: Any) -> None:
    encoded = validate_event(channel, data, event, 10**7)
    raw = encode_envelope(channel, f"{ms}-{seq}", event, encoded.data_json)
    env = decode_envelope(raw)
    assert env.channel == channel and env.id == EventId(ms, seq)
    assert env.event.decode() == event and json.loads(env.data) == data
    assert b"\n" not in env.data  # one SSE data line, whatever the payload


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_any_bytes_decode_or_raise_the_library_error(raw: bytes) -> None:
    with contextlib.suppress(InvalidEventError):
        decode_envelope(raw)


@given(st.text(max_size=140), JSON, st.text(max_size=70), st.integers(1, 4096))
@settings(max_examples=300)
def test_validate_event_accepts_or_raises_the_library_errors(
    channel: str, data: Any, event: str, limit: int
) -> None:
    try:
        encoded = validate_event(channel, data, event, limit)
    except (InvalidEventError, EventTooLargeError):
        return
    assert len(encoded.data_json.encode()) + len(event) <= limit
    assert json.loads(encoded.data_json) == data


@given(st.one_of(JSON, st.dictionaries(st.sampled_from(["event", "data", "x"]), JSON)))
@settings(max_examples=500)
def test_any_publish_body_parses_or_raises_the_library_error(body: Any) -> None:
    try:
        parsed = parse_publish_body(body)
    except InvalidEventError as exc:
        assert "Traceback" not in str(exc)
        return
    assert isinstance(body, dict) and set(body) <= {"event", "data"} and "data" in body
    assert parsed.data == body["data"]


# Regression (found by test_abuse.py): lone surrogates, which JSON allows as "\ud800" escapes
# and hypothesis' default text() never draws, made validate_event raise UnicodeEncodeError (a
# 500 on publish); deep nesting raised RecursionError.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)


@given(ANY_TEXT)
def test_data_with_any_code_point_is_accepted_or_refused_cleanly(text: str) -> None:
    try:
        encoded = validate_event("c", {"t": text}, "message", 10**6)
    except InvalidEventError as exc:
        assert "Unicode" in str(exc)
        return
    assert json.loads(encoded.data_json) == {"t": text}


def test_deeply_nested_data_is_refused_cleanly() -> None:
    value: Any = 1
    for _ in range(100_000):
        value = [value]
    try:
        validate_event("c", value, "message", 10**9)
    except InvalidEventError as exc:
        assert "nested too deeply" in str(exc)
