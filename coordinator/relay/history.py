"""Reading a channel's retained history (its Redis Stream) for replay.

One script (``lua/replay.lua``) returns the entries after an id together with
what is needed to tell whether some were lost: whether the stream exists, the
last id it ever generated, its oldest retained id, and whether it was trimmed.
"""

from __future__ import annotations

from typing import Any

from coordinator.errors import REDIS_UNREACHABLE, RedisUnavailableError
from coordinator.relay.events import EventId, parse_event_id, sse_frame
from coordinator.store.connection import RedisClient
from coordinator.store.scripts import REPLAY


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


class ReplayResult:
    """What :data:`~coordinator.store.scripts.REPLAY` read: entries after an id, and gap facts."""

    def __init__(self, reply: list[Any]) -> None:
        exists, last_generated, first_id, trimmed, entries = reply
        self.exists = bool(exists)
        self.last_generated = parse_event_id(last_generated) if last_generated else None
        self.first_id = parse_event_id(first_id) if first_id else None
        self.trimmed = int(trimmed)  # 1 yes, 0 no, -1 unknown (Redis < 7.0)
        self.entries: list[tuple[EventId, bytes]] = []
        for raw_id, fields in entries:
            values = dict(zip(map(_bytes, fields[::2]), map(_bytes, fields[1::2]), strict=True))
            raw = _bytes(raw_id)
            self.entries.append(
                (parse_event_id(raw), sse_frame(raw, values[b"event"], values[b"data"]))
            )

    def lost_after(self, after: EventId) -> str | None:
        """Why events after ``after`` may be missing from this read, or None if none are."""
        if not self.exists:
            return None
        if self.last_generated is not None and after > self.last_generated:
            return "unknown-id"
        # Trimming removes the oldest entries, so events after `after` were lost if the
        # oldest retained is newer than `after` (conservative: `after` itself may have
        # been the newest entry removed).
        if self.trimmed == 0 or self.first_id is None:
            return None
        return "trimmed" if self.first_id > after else None


async def read_history(
    redis: RedisClient, stream_key: str, channel: str, after: EventId | None, count: int
) -> ReplayResult:
    """Up to ``count`` entries of ``stream_key`` after ``after`` (0 only reads the facts).

    Raises:
        RedisUnavailableError: Redis could not be reached.
    """
    try:
        reply = await REPLAY(redis, [stream_key], [str(after or EventId(0, 0)), count])
    except REDIS_UNREACHABLE as exc:
        raise RedisUnavailableError(f"could not read channel {channel!r}: {exc}") from exc
    return ReplayResult(reply)
