"""Events on the wire: validation, stream ids, the Pub/Sub envelope, SSE frames.

Pure functions, no I/O; :mod:`coordinator.relay.relay` moves these bytes around.

- An event is ``(channel, event, data)``: ``channel`` follows the channel name
  rule (:data:`~coordinator.settings.NAME_PATTERN`), ``event`` the event name
  rule (:data:`EVENT_NAME_PATTERN`, ``reset`` reserved), ``data`` any
  JSON-serialisable value, encoded compactly once at publish time.
- Its id is the Redis Stream id the publish script got from ``XADD``
  (``"<ms>-<seq>"``); ids compare as ``(ms, seq)`` tuples.
- The Pub/Sub envelope is ``b"1\\n<channel>\\n<id>\\n<event>\\n<data json>"``:
  the subscriber splits it without parsing JSON (compact JSON has no raw
  newline, and names cannot contain one) and builds the SSE frame once.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from coordinator.errors import EventTooLargeError, InvalidEventError, InvalidEventIdError
from coordinator.settings import name_error

EVENT_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9._:-]{0,63}"
"""Rule for event names (the SSE ``event:`` field)."""

RESET_EVENT = "reset"
"""Event sent first when a client's Last-Event-ID is older than the retained history."""

ENVELOPE_VERSION = b"1"

_EVENT_RE = re.compile(EVENT_NAME_PATTERN)
_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64 = 2**64


class EventId(NamedTuple):
    """A stream id as a comparable ``(ms, seq)`` pair; ``str()`` gives ``"ms-seq"``."""

    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


def parse_event_id(value: str | bytes) -> EventId:
    """Parse ``"<ms>-<seq>"`` (both unsigned 64-bit integers).

    Raises:
        InvalidEventIdError: anything else (empty, ``"abc"``, ``"1-2-3"``, overflow).
    """
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    match = _ID_RE.fullmatch(text.strip())
    if match is None:
        raise InvalidEventIdError(text)
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms >= _U64 or seq >= _U64:
        raise InvalidEventIdError(text)
    return EventId(ms, seq)


def check_channel(channel: object) -> str:
    """Return ``channel`` if it follows the name rule (:data:`~coordinator.settings.NAME_PATTERN`).

    Raises:
        InvalidEventError: saying what a channel name may hold.
    """
    problem = name_error("channel", channel)
    if problem is not None:
        raise InvalidEventError(problem)
    assert isinstance(channel, str)
    return channel


class PublishBody(BaseModel):
    """The HTTP body of a publish: ``{"event": "message", "data": <any JSON>}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: str = Field(default="message", pattern=f"^{EVENT_NAME_PATTERN}$")
    data: JsonValue = Field(description="Any JSON value.")


class EncodedEvent(NamedTuple):
    channel: str
    event: str
    data_json: str


def validate_event(channel: str, data: Any, event: str, max_bytes: int) -> EncodedEvent:
    """Check an event and encode its data as compact JSON, once.

    Raises:
        InvalidEventError: bad channel or event name, reserved event name, data
            that is not JSON-serialisable (or contains NaN/Infinity).
        EventTooLargeError: event name plus encoded data over ``max_bytes``.
    """
    check_channel(channel)
    if not isinstance(event, str) or _EVENT_RE.fullmatch(event) is None:
        raise InvalidEventError(
            f"event name {event!r} is not valid: use 1-64 characters from letters, digits "
            "and '._:-', starting with a letter"
        )
    if event == RESET_EVENT:
        raise InvalidEventError(f"event name {RESET_EVENT!r} is reserved for replay resets")
    try:
        data_json = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidEventError(f"event data is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise InvalidEventError("event data is nested too deeply") from None
    try:
        size = len(data_json.encode("utf-8")) + len(event)
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): found by tests/chaos, was a 500
        raise InvalidEventError("event data holds text that is not valid Unicode") from None
    if size > max_bytes:
        raise EventTooLargeError(size, max_bytes)
    return EncodedEvent(channel, event, data_json)


def parse_publish_body(body: object) -> PublishBody:
    """Validate a decoded HTTP body ``{"event": ..., "data": ...}`` (the channel is in the path).

    Raises:
        InvalidEventError: the body is not an object of that shape; the message
            lists each problem.
    """
    if not isinstance(body, dict):
        raise InvalidEventError('body must be a JSON object: {"event": "message", "data": ...}')
    try:
        return PublishBody.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidEventError(f"invalid event body: {problems}") from None


class Envelope(NamedTuple):
    """A decoded Pub/Sub message: ``channel`` as text, the rest as raw bytes."""

    channel: str
    id: EventId
    raw_id: bytes
    event: bytes
    data: bytes


def encode_envelope(channel: str, event_id: str, event: str, data_json: str) -> bytes:
    """The Pub/Sub message the publish script builds (mirrored here for tests and tools)."""
    return b"\n".join(
        [
            ENVELOPE_VERSION,
            channel.encode(),
            event_id.encode(),
            event.encode(),
            data_json.encode("utf-8"),
        ]
    )


def decode_envelope(message: bytes) -> Envelope:
    """Split a Pub/Sub message into its parts.

    Raises:
        InvalidEventError: not an envelope of a version this code reads.
    """
    parts = message.split(b"\n", 4)
    if len(parts) != 5 or parts[0] != ENVELOPE_VERSION:
        raise InvalidEventError(f"not a relay envelope: {message[:40]!r}")
    try:
        event_id = parse_event_id(parts[2])
        channel = parts[1].decode("utf-8")
    except (InvalidEventIdError, UnicodeDecodeError):
        raise InvalidEventError(f"malformed relay envelope: {message[:40]!r}") from None
    return Envelope(channel, event_id, parts[2], parts[3], parts[4])


def sse_frame(raw_id: bytes, event: bytes, data: bytes) -> bytes:
    """One SSE message: ``id``, ``event`` and a single ``data`` line, ``\\n``-separated."""
    return b"id: " + raw_id + b"\nevent: " + event + b"\ndata: " + data + b"\n\n"


def reset_frame(last_event_id: EventId | None, reason: str) -> bytes:
    """The ``reset`` event. It has no ``id`` field: the client keeps its last id until the next."""
    data = json.dumps(
        {"reason": reason, "last_event_id": str(last_event_id) if last_event_id else None},
        separators=(",", ":"),
    )
    return b"event: " + RESET_EVENT.encode() + b"\ndata: " + data.encode() + b"\n\n"


def hello_frame(instance_id: str) -> bytes:
    """The ``hello`` event that opens every stream: which process serves it.

    It has no ``id`` field, so it never moves the client's Last-Event-ID.
    """
    data = json.dumps({"instance_id": instance_id}, separators=(",", ":"))
    return b"event: hello\ndata: " + data.encode() + b"\n\n"


def retry_frame(retry_ms: int) -> bytes:
    """The ``retry`` hint sent first on every stream."""
    return b"retry: %d\n\n" % retry_ms
