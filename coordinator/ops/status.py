"""What an operator asks of a namespace: who leads, who runs, which channels hold what.

Read-only, a few round trips; used by the ``coordinator status`` command. The
answer holds only what the HTTP contract already shows (the leader as
``GET /api/leader`` gives it, instances as ``GET /api/instance`` describes
them): no addresses, client ids or secrets. (The command adds which Redis it
asked, password masked.)
"""

from __future__ import annotations

from typing import Any

from coordinator.election.lease import read_leader
from coordinator.ops.presence import instances_seen
from coordinator.relay.events import parse_event_id
from coordinator.settings import CoordinatorSettings
from coordinator.store.codec import text
from coordinator.store.connection import RedisClient, is_cluster_url
from coordinator.store.keys import Keys

MAX_CHANNELS = 1000
"""Channels listed at most (the scan stops there; ``channels_truncated`` says so)."""


async def channel_histories(
    redis: RedisClient, keys: Keys, limit: int = MAX_CHANNELS
) -> tuple[list[dict[str, Any]], bool]:
    """Channels with a retained history: name, events kept, last event id; sorted by name.

    Returns the list and whether it was cut at ``limit``.
    """
    names: list[str] = []
    truncated = False
    async for key in redis.scan_iter(match=keys.streams_pattern(), count=500, _type="stream"):
        if len(names) >= limit:
            truncated = True
            break
        names.append(text(key))
    names.sort()
    if not names:
        return [], False
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.xlen(name)
            pipe.xrevrange(name, count=1)
        replies = await pipe.execute()
    out = []
    for i, name in enumerate(names):
        size, last = replies[2 * i], replies[2 * i + 1]
        last_id = str(parse_event_id(last[0][0])) if last else None
        channel = keys.stream_channel_of(name.encode("utf-8")) or name
        out.append({"channel": channel, "history": int(size), "last_event_id": last_id})
    return out, truncated


async def cluster_status(redis: RedisClient, settings: CoordinatorSettings) -> dict[str, Any]:
    """Leader (with term and TTL left), instances seen recently, channels and their history."""
    keys = Keys(settings.namespace, sharded=is_cluster_url(settings.redis_url))
    leader = await read_leader(redis, keys, settings.election_name)
    instances = await instances_seen(redis, keys)
    channels, truncated = await channel_histories(redis, keys)
    return {
        "namespace": settings.namespace,
        "election": settings.election_name,
        "leader": leader.as_dict() if leader else None,
        "term": leader.fencing_token if leader else None,
        "ttl_ms": leader.ttl_ms if leader else None,
        "instances": [i.as_dict() for i in instances],
        "channels": channels,
        "channels_truncated": truncated,
    }
