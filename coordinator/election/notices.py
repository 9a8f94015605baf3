"""Following a Pub/Sub notice channel for as long as the caller wants.

Notices are hints that let a process act at once instead of at its next poll
(a released lease, a finished run-once task). Losing one costs only latency,
so the listener simply reconnects with backoff and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.backoff import FullJitterBackoff

from coordinator.errors import REDIS_UNREACHABLE
from coordinator.store.connection import RedisClient, ready_for_pubsub, recover_topology

logger = logging.getLogger("coordinator.election")


async def listen_for_notices(
    redis: RedisClient,
    channel: str,
    on_notice: Callable[[bytes], None],
    *,
    backoff_cap: float,
    who: str,
) -> None:
    """Call ``on_notice(data)`` for every message on ``channel`` until cancelled.

    Uses one Pub/Sub connection from ``redis``'s pool (on Cluster, to the node of
    the channel's slot: classic Pub/Sub reaches every node); reconnects with
    jittered backoff (capped at ``backoff_cap`` seconds) whenever it drops, on
    Cluster after reading the slot map again.
    """
    backoff = FullJitterBackoff(cap=backoff_cap, base=0.1)
    failures = 0
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await ready_for_pubsub(redis)
            await pubsub.subscribe(channel)
            failures = 0
            while True:
                message = await pubsub.get_message(timeout=30.0)
                if message is not None:
                    on_notice(message["data"])
        except REDIS_UNREACHABLE as exc:
            logger.debug("%s: notice listener on %s: %s", who, channel, exc)
            await asyncio.sleep(backoff.compute(min(failures, 16)))
            failures += 1
            await recover_topology(redis)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
