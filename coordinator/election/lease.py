"""The lease as data: who holds it, read from Redis.

A lease value is a JSON object written once per term by the ``acquire`` script:
``instance_id``, ``hostname``, ``pid``, ``client_id`` (the holder's Redis
connection), ``fencing_token`` (a string: tokens exceed 2**53 precision in
Lua's cjson otherwise), ``acquired_at`` (server ms) and ``ttl_ms``. It never
changes during the term, so comparing it exactly identifies the term.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from coordinator.clock import ms_to_datetime
from coordinator.store.connection import RedisClient
from coordinator.store.keys import Keys
from coordinator.store.scripts import READ_LEASE


@dataclass(frozen=True)
class Term:
    """One leadership term of this process: its fencing token and exact lease value."""

    token: int
    lease_value: str
    client_id: int


@dataclass(frozen=True)
class LeaderInfo:
    """Who holds a lease, as read from Redis."""

    instance_id: str
    hostname: str
    pid: int
    fencing_token: int
    acquired_at: datetime
    renewed_at: datetime
    ttl_ms: int
    client_id: int

    def as_dict(self) -> dict[str, Any]:
        """The public view (``GET /api/leader``): no client id."""
        return {
            "instance_id": self.instance_id,
            "hostname": self.hostname,
            "pid": self.pid,
            "fencing_token": self.fencing_token,
            "acquired_at": self.acquired_at.isoformat(),
            "renewed_at": self.renewed_at.isoformat(),
            "ttl_ms": self.ttl_ms,
        }


def parse_lease(value: bytes | str, pttl_ms: int, now_ms: int) -> LeaderInfo:
    """Build a :class:`LeaderInfo` from a lease value and its remaining TTL."""
    data = json.loads(value)
    ttl_total = int(data.get("ttl_ms", 0))
    acquired_ms = int(data["acquired_at"])
    # The renewal time is estimated from the remaining TTL, which Redis rounds
    # to whole milliseconds: never report it as earlier than the acquisition.
    renewed_ms = max(acquired_ms, now_ms - max(0, ttl_total - pttl_ms))
    return LeaderInfo(
        instance_id=str(data["instance_id"]),
        hostname=str(data.get("hostname", "")),
        pid=int(data.get("pid", 0)),
        fencing_token=int(data["fencing_token"]),
        acquired_at=ms_to_datetime(acquired_ms),
        renewed_at=ms_to_datetime(renewed_ms),
        ttl_ms=max(0, pttl_ms),
        client_id=int(data.get("client_id", 0)),
    )


async def read_leader(redis: RedisClient, keys: Keys, election: str) -> LeaderInfo | None:
    """The current holder of ``election``'s lease, or ``None``. One round trip."""
    value, pttl, now_ms = await READ_LEASE(redis, [keys.lease(election)])
    if value is None or int(pttl) < 0:
        return None
    return parse_lease(value, int(pttl), int(now_ms))
