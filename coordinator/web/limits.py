"""Per-client limits of the channel routes, counted across every worker and pod.

Two limits, both off by default:

- publishes per second per client (``COORDINATOR_PUBLISH_RATE_PER_CLIENT``, bursts
  of ``COORDINATOR_PUBLISH_BURST``): over it, ``429`` with ``Retry-After``;
- open SSE streams per client (``COORDINATOR_SSE_MAX_CONNECTIONS_PER_CLIENT``):
  over it, ``429`` with ``Retry-After``.

They are kept in Redis (:mod:`coordinator.state.limits`), so with N workers a
client gets each limit once, not N times.

When Redis cannot be reached, ``COORDINATOR_LIMITS_FAIL_OPEN`` decides: ``false``
(the default, safe for a public endpoint) refuses with ``503`` and
``Retry-After: 1``; ``true`` lets the request through and logs it (at most once a
second a process). Publishing and streaming need Redis anyway, so failing
closed costs nothing while Redis is down.

Who is "a client": by default the address uvicorn reports
(``request.client.host``; run uvicorn with ``--proxy-headers`` and
``--forwarded-allow-ips`` behind a proxy, or every client is the proxy). Pass
``client_key=`` to count by something else (an API key, a user id).

Redis cost per request with a limit on: one script to publish (one more read
when refusing, for ``Retry-After``); one script to open a stream and one
``ZREM`` when it closes; plus one renewal script per process every third of
the lease TTL.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from fastapi import HTTPException, Request

from coordinator.settings import CoordinatorSettings
from coordinator.state.limits import ClusterRateLimiter, LimitDecision, StreamSlot, StreamSlots
from coordinator.store.connection import RedisClient

logger = logging.getLogger("coordinator.limits")

ClientKey = Callable[[Request], str]


def client_address(request: Request) -> str:
    """The default client identity: the peer address uvicorn reports."""
    return request.client.host if request.client else "unknown"


class ClientLimits:
    """The channel routes' per-client limits, as HTTP answers.

    Args:
        redis: the coordinator's client (its pool is shared by the limiters).
        settings: the limits (0: off), the namespace and the fail mode.
        client_key: who a request's client is (default :func:`client_address`).
    """

    def __init__(
        self,
        redis: RedisClient,
        settings: CoordinatorSettings,
        client_key: ClientKey = client_address,
    ) -> None:
        self.settings = settings
        self.client_key = client_key
        self.publishes: ClusterRateLimiter | None = None
        self.streams: StreamSlots | None = None
        if settings.publish_rate_per_client > 0:
            self.publishes = ClusterRateLimiter(
                redis, settings, settings.publish_rate_per_client, settings.publish_burst
            )
        if settings.sse_max_connections_per_client > 0:
            self.streams = StreamSlots(redis, settings, settings.sse_max_connections_per_client)
        self._logged_at = 0.0

    async def check_publish(self, request: Request, headers: dict[str, str]) -> None:
        """Count one publish; raise ``HTTPException`` 429 (over) or 503 (Redis, closed)."""
        if self.publishes is None:
            return
        decision = await self.publishes.hit(self.client_key(request))
        limit = self.publishes
        self._raise_unless_allowed(
            decision,
            headers,
            f"over the publish rate of {limit.burst} per {limit.window_s}s for this client "
            "(COORDINATOR_PUBLISH_RATE_PER_CLIENT, COORDINATOR_PUBLISH_BURST); retry later",
        )

    async def open_stream(self, request: Request, headers: dict[str, str]) -> StreamSlot | None:
        """Take a stream slot (``None`` when the limit is off); raise 429 or 503."""
        if self.streams is None:
            return None
        decision, slot = await self.streams.acquire(self.client_key(request))
        self._raise_unless_allowed(
            decision,
            headers,
            f"this client already has {self.streams.limit} open streams on this service "
            "(COORDINATOR_SSE_MAX_CONNECTIONS_PER_CLIENT); close one first",
        )
        return slot

    def release(self, slot: StreamSlot | None) -> None:
        if slot is not None and self.streams is not None:
            self.streams.release(slot)

    async def stop(self) -> None:
        if self.streams is not None:
            await self.streams.stop()

    def _raise_unless_allowed(
        self, decision: LimitDecision, headers: dict[str, str], over: str
    ) -> None:
        if decision.unavailable is not None:
            if decision.allowed:
                now = time.monotonic()
                if now - self._logged_at >= 1.0:
                    self._logged_at = now
                    logger.warning(
                        "%s; allowed (COORDINATOR_LIMITS_FAIL_OPEN)", decision.unavailable
                    )
                return
            raise HTTPException(
                503,
                f"{decision.unavailable}; refused (COORDINATOR_LIMITS_FAIL_OPEN is false)",
                headers={**headers, "Retry-After": "1"},
            )
        if not decision.allowed:
            retry = {**headers, "Retry-After": str(max(1, math.ceil(decision.retry_after_s)))}
            raise HTTPException(429, over, headers=retry)
