"""Per-client limits for the channel routes: open SSE streams and publish rate.

Both are kept in memory, per process, keyed by the client address uvicorn
reports (``request.client.host``; run uvicorn with ``--proxy-headers`` and
``--forwarded-allow-ips`` behind a proxy, or every client is the proxy). With
N worker processes a client may get up to N times a limit, as its connections
spread over workers; set limits with that in mind. Both are off by default
(``COORDINATOR_SSE_MAX_CONNECTIONS_PER_CLIENT``, ``COORDINATOR_PUBLISH_RATE_PER_CLIENT``).
"""

from __future__ import annotations

import math
import time

MAX_TRACKED = 10_000
"""Rate buckets kept before idle (full) ones are forgotten."""


class ConnectionLimiter:
    """Counts open streams per client; ``limit`` 0 means no limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        """Take a slot for ``client``; False when it already has ``limit`` open."""
        count = self._open.get(client, 0)
        if self.limit and count >= self.limit:
            return False
        self._open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)

    def open(self, client: str) -> int:
        return self._open.get(client, 0)


class RateLimiter:
    """A token bucket per client: ``rate`` a second, bursts of ``burst``; rate 0 is off."""

    def __init__(self, rate: float, burst: int = 0) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(rate)))
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str) -> float:
        """Spend one token: 0.0 when allowed, else the seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens, at = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED:
            self._forget_idle(now)
        return 0.0

    def _forget_idle(self, now: float) -> None:
        full = self.burst / self.rate
        for client, (_, at) in list(self._buckets.items()):
            if now - at >= full:
                del self._buckets[client]
