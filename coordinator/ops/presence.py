"""Presence: which instances of a namespace are running, for status tools.

Every running :class:`~coordinator.Coordinator` heartbeats every
``presence_interval_s``: it writes its description to ``Keys.instance(id)``
(TTL three periods) and its last-seen time to the ``Keys.instances()`` sorted
set. Readers list the sorted set: an entry whose description key still exists
is *alive*; one whose key expired was seen recently and is gone (crashed, or
stopped: a graceful stop deletes the key at once). Entries older than
:data:`RETENTION_S` are trimmed by the heartbeats.

The description holds only what ``GET /api/instance`` already shows
(instance id, hostname, pid, role) plus start and last-seen times: no
addresses, Redis client ids or secrets.

Presence is informational. Nothing in election or scheduling depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from coordinator.errors import REDIS_UNREACHABLE
from coordinator.settings import CoordinatorSettings
from coordinator.store.codec import text
from coordinator.store.connection import RedisClient
from coordinator.store.keys import Keys
from coordinator.tasks import cancel_and_wait

logger = logging.getLogger("coordinator.presence")

RETENTION_S = 600.0
"""How long an instance that stopped heartbeating stays listed (as not alive)."""


@dataclass(frozen=True)
class InstanceSeen:
    """One instance as the presence set knows it."""

    instance_id: str
    last_seen_ms: int
    alive: bool
    hostname: str | None = None
    pid: int | None = None
    role: str | None = None
    started_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "alive": self.alive,
            "last_seen_ms": self.last_seen_ms,
            "hostname": self.hostname,
            "pid": self.pid,
            "role": self.role,
            "started_ms": self.started_ms,
        }


class PresenceHeartbeat:
    """Keeps this instance listed while it runs. ``redis`` is used, not owned."""

    def __init__(self, redis: RedisClient, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self._redis = redis
        self._task: asyncio.Task[None] | None = None
        self._started_ms = int(time.time() * 1000)
        self._info = json.dumps(
            {
                "instance_id": settings.instance_id,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "role": settings.role,
                "started_ms": self._started_ms,
            },
            separators=(",", ":"),
        )

    async def beat(self) -> None:
        """Write one heartbeat now. Raises ``redis`` errors."""
        now = int(time.time() * 1000)
        ttl_ms = int(self.settings.presence_interval_s * 3000)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.instance(self.settings.instance_id), self._info, px=ttl_ms)
            pipe.zadd(self.keys.instances(), {self.settings.instance_id: now})
            pipe.zremrangebyscore(self.keys.instances(), "-inf", now - int(RETENTION_S * 1000))
            await pipe.execute()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="coordinator-presence")

    async def stop(self) -> None:
        """Stop heartbeating and mark this instance gone (best effort)."""
        if self._task is None:
            return
        await cancel_and_wait(self._task)
        self._task = None
        with contextlib.suppress(*REDIS_UNREACHABLE):
            async with asyncio.timeout(1.0):
                await self._redis.delete(self.keys.instance(self.settings.instance_id))

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
            except REDIS_UNREACHABLE as exc:
                logger.debug("presence heartbeat failed: %s", type(exc).__name__)
            await asyncio.sleep(self.settings.presence_interval_s)


async def instances_seen(redis: RedisClient, keys: Keys) -> list[InstanceSeen]:
    """Every instance seen within :data:`RETENTION_S`, most recently seen first."""
    since = int(time.time() * 1000 - RETENTION_S * 1000)
    entries: list[tuple[bytes | str, float]] = list(
        await redis.zrevrangebyscore(keys.instances(), "+inf", since, withscores=True)  # type: ignore[arg-type]
    )
    if not entries:
        return []
    ids = [text(m) for m, _ in entries]
    infos = await redis.mget([keys.instance(i) for i in ids])
    out = []
    for instance_id, (_, score), raw in zip(ids, entries, infos, strict=True):
        info: dict[str, Any] = {}
        if raw is not None:
            with contextlib.suppress(ValueError):
                info = json.loads(raw)
        out.append(
            InstanceSeen(
                instance_id=instance_id,
                last_seen_ms=int(score),
                alive=raw is not None,
                hostname=info.get("hostname"),
                pid=info.get("pid"),
                role=info.get("role"),
                started_ms=info.get("started_ms"),
            )
        )
    return out
