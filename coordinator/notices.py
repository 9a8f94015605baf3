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

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .backoff import Backoff

logger = logging.getLogger("coordinator.notices")


async def listen_for_notices(
    redis: Redis,
    channel: str,
    on_notice: Callable[[bytes], None],
    *,
    backoff_cap: float,
    who: str,
) -> None:
    """Call ``on_notice(data)`` for every message on ``channel`` until cancelled.

    Uses one Pub/Sub connection from ``redis``'s pool; reconnects with jittered
    backoff (capped at ``backoff_cap`` seconds) whenever it drops.
    """
    backoff = Backoff(base=0.1, cap=backoff_cap)
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            backoff.reset()
            while True:
                message = await pubsub.get_message(timeout=30.0)
                if message is not None:
                    on_notice(message["data"])
        except (RedisError, OSError) as exc:
            logger.debug("%s: notice listener on %s: %s", who, channel, exc)
            await asyncio.sleep(backoff.next())
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
