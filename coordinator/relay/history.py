"""Reading a channel's retained history (its Redis Stream) for replay.

One script (``lua/replay.lua``) returns the entries after an id together with
what is needed to tell whether some were lost: whether the stream exists, the
last id it ever generated, its oldest retained id, and whether it was trimmed.
"""

from __future__ import annotations

import time
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

    def lost_after(self, after: EventId, stream_ttl_s: float) -> str | None:
        """Why events after ``after`` may be missing from this read, or None if none are.

        - ``unknown-id``: ``after`` is newer than any id the stream ever generated.
        - ``trimmed``: the oldest retained entry is newer than ``after`` and the stream
          was trimmed (conservative: ``after`` itself may have been the newest removed).
        - ``lost``: the stream cannot have held ``after`` and its idle expiry
          (``stream_ttl_s`` after the last publish) cannot explain why. It is gone
          although ``after`` is younger than ``stream_ttl_s``, or it was never trimmed
          yet starts after ``after`` with its first entry added within ``stream_ttl_s``
          of ``after``, when the old stream still existed. So it was deleted, or lost
          with Redis' data (a restart without persistence), and events after ``after``
          published before that may be gone unseen. ``after`` 0-0 (nothing seen yet)
          loses nothing. Compares the local clock with Redis' ids when the stream is
          gone: skew matters only near ``stream_ttl_s``.
        """
        if not self.exists:
            now_ms = time.time() * 1000
            return "lost" if _within(after, now_ms, stream_ttl_s) else None
        if self.last_generated is not None and after > self.last_generated:
            return "unknown-id"
        if self.first_id is None or self.first_id <= after:
            return None
        if self.trimmed != 0:  # trimmed, or unknown (Redis < 7.0): assume trimmed
            return "trimmed"
        return "lost" if _within(after, self.first_id.ms, stream_ttl_s) else None


def _within(after: EventId, at_ms: float, ttl_s: float) -> bool:
    """Whether a stream that held ``after`` (a real id, not 0-0) must still have
    existed at ``at_ms``, its idle expiry not yet due."""
    return after != EventId(0, 0) and at_ms - after.ms < ttl_s * 1000


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
