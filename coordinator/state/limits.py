"""Per-client limits counted across every worker and pod, on the coordinator's Redis.

- :class:`ClusterRateLimiter`: a rate per client through the ``limits`` library
  (``SlidingWindowCounterRateLimiter`` on its async ``RedisStorage``, sharing
  the coordinator's connection pool: no second pool, Sentinel included, because
  the storage is given the pool rather than a URL; on Redis Cluster, its
  ``RedisClusterStorage`` is given the coordinator's own ``RedisCluster``).
- :class:`StreamSlots`: open streams per client. ``limits`` counts events in
  time windows; it has no concurrency limit (a slot taken at open and given back
  at close, that must also come back by itself when the holder crashes). So
  this one is hand-written, and small: a sorted set per client of stream ids
  scored by expiry, one Lua script to count-and-take, and a heartbeat per
  process that pushes its streams' expiry forward.

Guarantees:

- The rate is counted per client in Redis, whichever process each request
  lands on: with N workers a client gets the limit once, not N times. One
  script per request (one more read when refusing, for ``Retry-After``).
- A client gets at most ``burst`` in one window of ``ceil(burst / rate)``
  seconds, and the previous window's count weighs on the current one by the
  share of it still within the last window: capacity comes back smoothly,
  as from a token bucket of ``burst`` refilled at ``rate``. Over any span of
  ``t`` seconds a client gets at most about ``burst + rate * t`` (10/s with
  bursts of 10: at most 30 in 2 s), and never more than ``burst`` in one window.
- A client never holds more than ``limit`` open streams by acquisitions: the
  count and the take are one script. A stream stops counting when it is
  released, or at most ``lease_ttl_ms`` after its process last renewed it (a
  SIGKILLed worker's streams free themselves within the lease TTL). Renewal
  runs every third of that.
- When Redis cannot be reached (or answers slower than ``LIMIT_TIMEOUT_S``),
  the decision follows ``limits_fail_open``: refuse (the default, safe for a
  public endpoint) or allow. Either way the decision says so.

Limits, said plainly:

- The sliding window counter is the ``limits`` library's: it weighs the previous
  window as if its hits were spread evenly (an approximation; it uses Redis's
  clock, as the stream expiries do, so hosts' clocks do not matter).
- The window is whole seconds: with ``burst / rate`` not a whole number, the
  sustained rate is ``burst / ceil(burst / rate)``, a little under ``rate``.
- After a Redis outage a process's heartbeat adds its open streams back, even
  if that puts a client over its limit for a while: they are open.
- A stream admitted while failing open counts from the next heartbeat that
  reaches Redis.
- On Redis Cluster every limit key carries the namespace's hash tag, as the
  election's and the scheduler's do: one shard serves all of them (each limit is
  still one script on one node; a renewal's keys share that slot). The rate
  limiter's scripts are redis-py ``Script`` objects: on a script-cache miss (first
  use, or after that shard failed over) redis-py loads them on every primary, so a
  decision made while another shard is down then fails (and follows
  ``limits_fail_open``). A shard failover
  is ridden through by the cluster client; counts not yet replicated when the
  primary died are lost with it (a client may get up to one window's extra burst,
  and open streams count again from the next renewal).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from coordinator.errors import REDIS_UNREACHABLE
from coordinator.settings import CoordinatorSettings
from coordinator.store.connection import RedisClient
from coordinator.store.keys import Keys
from coordinator.store.scripts import STREAM_ACQUIRE, STREAM_RENEW
from coordinator.tasks import cancel_and_wait

if TYPE_CHECKING:
    from limits import RateLimitItem
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import SlidingWindowCounterRateLimiter

logger = logging.getLogger("coordinator.limits")

LIMIT_TIMEOUT_S = 1.0
"""A limiter call slower than this counts as Redis unreachable."""
RENEW_BATCH = 500
"""Client keys per renewal script call."""
_UNREACHABLE: tuple[type[BaseException], ...] = (*REDIS_UNREACHABLE, TimeoutError)


@dataclass(frozen=True, slots=True)
class LimitDecision:
    """A limiter's answer for one request."""

    allowed: bool
    retry_after_s: float = 0.0
    """When refused: seconds until the client may succeed (a hint, at least 1 s)."""
    unavailable: str | None = None
    """Set when Redis could not be asked: why. ``allowed`` then follows the fail mode."""


def client_token(client: str) -> str:
    """A client identity fit for a key name: itself when short and plain, else its SHA-1."""
    if 0 < len(client) <= 100 and client.isprintable() and " " not in client:
        return client
    return "sha1:" + hashlib.sha1(client.encode("utf-8", "surrogatepass")).hexdigest()


def _unavailable(exc: BaseException, fail_open: bool, what: str) -> LimitDecision:
    reason = f"{what}: Redis unreachable ({type(exc).__name__}: {exc})"
    return LimitDecision(allowed=fail_open, retry_after_s=1.0, unavailable=reason)


class ClusterRateLimiter:
    """About ``rate`` hits a second per client with bursts of ``burst``, cluster-wide
    (a sliding window counter of ``burst`` per ``ceil(burst / rate)`` seconds).

    Args:
        redis: the coordinator's client (a ``RedisCluster`` on Cluster); its
            connections are shared, not copied.
        settings: namespace and ``limits_fail_open``.
        rate: hits a second, sustained (> 0).
        burst: most hits in a row; 0: ``rate`` rounded up.
        name: names this limit in Redis keys (``publish``).
    """

    def __init__(
        self,
        redis: RedisClient,
        settings: CoordinatorSettings,
        rate: float,
        burst: int = 0,
        name: str = "publish",
    ) -> None:
        from limits import RateLimitItemPerSecond
        from limits.aio.strategies import SlidingWindowCounterRateLimiter

        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.burst = burst or max(1, math.ceil(rate))
        self.window_s = max(1, math.ceil(self.burst / rate))
        self.fail_open = settings.limits_fail_open
        self.item: RateLimitItem = RateLimitItemPerSecond(self.burst, self.window_s, name)
        storage = _storage(redis, Keys(settings.namespace).limits_prefix())
        self._limiter: SlidingWindowCounterRateLimiter = SlidingWindowCounterRateLimiter(storage)

    async def hit(self, client: str) -> LimitDecision:
        """Count one hit for ``client``: allowed, or refused with a retry hint.

        One Redis script when allowed; one more read when refused (for Retry-After).
        """
        token = client_token(client)
        try:
            async with asyncio.timeout(LIMIT_TIMEOUT_S):
                if await self._limiter.hit(self.item, token):
                    return LimitDecision(True)
                stats = await self._limiter.get_window_stats(self.item, token)
        except _UNREACHABLE as exc:
            return _unavailable(exc, self.fail_open, "rate limit")
        wait = min(float(self.window_s), stats.reset_time - time.time())
        return LimitDecision(False, max(1.0, wait))


def _storage(redis: RedisClient, key_prefix: str) -> RedisStorage:
    """A ``limits`` storage on ``redis``'s own connections (no second pool)."""
    from limits.aio.storage import RedisClusterStorage, RedisStorage

    if isinstance(redis, Redis):
        return RedisStorage(
            "async+redis://",
            implementation="redispy",
            key_prefix=key_prefix,
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]
        )

    class SharedClusterStorage(RedisClusterStorage):
        # limits builds its own RedisCluster from a URL; ours already follows the
        # cluster's slot map and carries the URL's auth and TLS, so the bridge is
        # pointed at it instead (the two attributes its use_cluster() sets, in every
        # limits 5.x; checked below).
        def configure_bridge(self) -> None:
            bridge: Any = self.bridge
            bridge.storage = redis
            bridge.connection_getter = lambda _readonly: redis

    storage = SharedClusterStorage(
        "async+redis+cluster://", implementation="redispy", key_prefix=key_prefix
    )
    shared: Any = storage.bridge
    if shared.get_connection() is not redis:  # what every limits 5.x command goes through
        import limits

        raise RuntimeError(
            f"limits {limits.__version__} no longer takes a shared RedisCluster; "
            "install the versions coordinator names (limits>=5.1,<6)"
        )
    return storage


@dataclass(eq=False)
class StreamSlot:
    """One open stream's place in its client's count (see :class:`StreamSlots`)."""

    key: str
    member: str
    released: bool = field(default=False)


class StreamSlots:
    """At most ``limit`` open streams per client across every process (module doc).

    :meth:`acquire` takes a slot; :meth:`release` gives it back (and never blocks:
    the removal is sent by this object's background task, which also renews the
    expiry of every slot held here every ``ttl_ms / 3``). The task starts with the
    first slot; :meth:`stop` ends it and gives back every slot still held.
    """

    def __init__(self, redis: RedisClient, settings: CoordinatorSettings, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, not {limit}")
        self.limit = limit
        self.ttl_ms = settings.lease_ttl_ms
        self.renew_every_s = self.ttl_ms / 3000
        self.fail_open = settings.limits_fail_open
        self._redis = redis
        self._keys = Keys(settings.namespace)
        self._ids = itertools.count(1)
        self._prefix = f"{settings.instance_id}:{id(self):x}:"
        self._held: dict[str, dict[str, StreamSlot]] = {}
        self._released: list[StreamSlot] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.renewals = 0
        """Heartbeats that reached Redis."""

    @property
    def held(self) -> int:
        """Slots this process holds now."""
        return sum(len(s) for s in self._held.values())

    async def acquire(self, client: str) -> tuple[LimitDecision, StreamSlot | None]:
        """Take a slot for ``client``. Allowed: the slot (release it when the stream
        ends). Refused: no slot, and a retry hint. Redis unreachable: per the fail mode
        (a slot admitted while failing open counts from the next renewal)."""
        slot = StreamSlot(
            self._keys.client_streams(client_token(client)),
            f"{self._prefix}{next(self._ids)}",
        )
        try:
            async with asyncio.timeout(LIMIT_TIMEOUT_S):
                reply = await STREAM_ACQUIRE(
                    self._redis, [slot.key], [slot.member, self.limit, self.ttl_ms]
                )
        except _UNREACHABLE as exc:
            decision = _unavailable(exc, self.fail_open, "stream limit")
            if decision.allowed:
                self._hold(slot)
                return decision, slot
            return decision, None
        if int(reply[0]) != 1:
            return LimitDecision(False, max(1.0, int(reply[2]) / 1000)), None
        self._hold(slot)
        return LimitDecision(True), slot

    def release(self, slot: StreamSlot) -> None:
        """Give the slot back (idempotent; the Redis removal follows in the background)."""
        if slot.released:
            return
        slot.released = True
        held = self._held.get(slot.key)
        if held is not None:
            held.pop(slot.member, None)
            if not held:
                del self._held[slot.key]
        self._released.append(slot)
        self._wake.set()

    async def stop(self) -> None:
        """End the background task and give back every slot still held (best effort:
        what cannot be removed expires within the lease TTL)."""
        await cancel_and_wait(self._task, name="stream-slots")
        self._task = None
        for slots in list(self._held.values()):
            for slot in list(slots.values()):
                self.release(slot)
        with contextlib.suppress(*_UNREACHABLE):
            async with asyncio.timeout(LIMIT_TIMEOUT_S):
                await self._flush_releases()

    def _hold(self, slot: StreamSlot) -> None:
        self._held.setdefault(slot.key, {})[slot.member] = slot
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="coordinator-stream-slots")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_renewal = loop.time() + self.renew_every_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_renewal - loop.time())):
                    await self._wake.wait()
            self._wake.clear()
            try:
                # Removals and renewals go out in order from this one task, so a renewal
                # never re-adds a slot whose removal was sent before it.
                async with asyncio.timeout(LIMIT_TIMEOUT_S * 5):
                    await self._flush_releases()
                    if loop.time() >= next_renewal:
                        next_renewal = loop.time() + self.renew_every_s
                        await self._renew()
            except _UNREACHABLE as exc:
                logger.warning("stream slots: Redis unreachable (%s); retrying", exc)

    async def _flush_releases(self) -> None:
        releases, self._released = self._released, []
        if not releases:
            return
        by_key: dict[str, list[str]] = {}
        for slot in releases:
            by_key.setdefault(slot.key, []).append(slot.member)
        pipe = self._redis.pipeline(transaction=False)
        for key, members in by_key.items():
            pipe.zrem(key, *members)
        await pipe.execute()

    async def _renew(self) -> None:
        items = [(key, list(slots)) for key, slots in self._held.items() if slots]
        for start in range(0, len(items), RENEW_BATCH):
            batch = items[start : start + RENEW_BATCH]
            args: list[Any] = [self.ttl_ms]
            for _, members in batch:
                args += [len(members), *members]
            await STREAM_RENEW(self._redis, [key for key, _ in batch], args)
        if items:
            self.renewals += 1
