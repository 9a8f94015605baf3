"""Leader election on a renewing Redis lease, with fencing tokens.

Guarantees:

- At most one lease exists per election name; it is taken with ``SET NX PX``
  (inside the ``acquire`` script, which also hands out the fencing token).
- Fencing tokens strictly increase, even after Redis lost every key: a missing
  counter is seeded from the server clock (ms x 1000) before incrementing.
- A leader renews every ``renew_interval``. If no renewal has succeeded within
  ``renew_deadline`` (measured on the monotonic clock from the *start* of the
  last successful renewal) it steps down on its own, before the lease can
  expire on the server (``renew_deadline < lease_ttl``). :attr:`LeaderElector.is_leader`
  turns false at that deadline even if the event loop has not run since.
- On :meth:`LeaderElector.stop` the leader runs ``on_revoked`` first (its work
  stops), then deletes its exact lease and publishes a notice, so followers
  campaign at once instead of waiting for the TTL.
- One follower, the *heir*, checks every ``retry_period / 4`` that the
  holder's Redis connection still exists (``CLIENT LIST ID``); a crashed
  holder's sockets close, so its lease is deleted (compare-and-delete), a
  notice wakes every follower, and the lease is taken within about a quarter
  of a retry period. A holder whose host vanished without closing its sockets
  is caught by the TTL (the heir campaigns at the same pace).
- The other followers cost Redis almost nothing: they campaign once every
  ``10 * retry_period`` and otherwise wait for a notice (a release, a crash
  found by the heir, a vacant heir role). The heir role is a key with a TTL of
  ``2 * retry_period``: the leader's renewal announces a vacancy, so a crashed
  heir is replaced within one renew interval, and a follower on another host
  takes the role from an heir on the leader's own host.

Limits, said plainly:

- Local belief is not safety. A paused process (GC, SIGSTOP, a stalled VM)
  can wake believing nothing happened; anything done "as leader" must be
  claimed with :meth:`LeaderElector.check` or a script built on ``lease_lib``,
  which compares the caller's lease inside Redis. The scheduler does this for
  every fire. Pass :attr:`Term.token` to downstream systems to fence them too.
- Timing assumes clocks advance at roughly the same rate on clients and
  server (not that they agree on the time).
- If the leader and its heir die together (one host, all of its processes),
  the next follower's own check finds the lease gone within
  ``10 * retry_period`` after it expires.
- If the leader's own Redis connection is replaced (a network blip), the lease
  still names the old connection; the leader steps down and campaigns again,
  a spurious but safe failover.
- With Sentinel, Cluster or replication, a failover can lose the last writes
  (Redis replication is asynchronous); the new primary may let a second leader
  in while the old one still believes it leads for up to ``renew_deadline``.
  Claims stay safe only on the primary that holds the current lease.

On Redis Cluster (a ``RedisCluster`` client from a ``redis+cluster://`` URL) the
election's keys share the namespace's hash slot. The lease connection is a
plain connection to that slot's primary, so ``CLIENT LIST ID`` looks on the
node that holds the lease. After any Redis error on it (not only a failover or
a slot migration: any error, so a leader loses its term where on one node only
a reconnect would cost it) the connection is closed, the slot map read again,
and a new connection made to the slot's primary then; the leader steps down
("connection replaced") and campaigns again.

Fencing across a failover (Sentinel or Cluster): the acquisition's writes (the
lease and the token counter) replicate asynchronously. If the primary dies
before they reach the replica, both roll back and the next leader gets the same
token again. Such a term could not have had a claim confirmed by ``WAIT`` (the
claim is later than the acquisition, and ``WAIT`` confirms the replication
offset, which covers it); with ``min_replicas`` the scheduler relies on that.
Connection ids are per node: after a failover the heir asks the promoted node
about an id the old primary handed out; if the new node happens to have a
client with that id, the heir believes the holder alive and the lease TTL ends
the term instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import FullJitterBackoff
from redis.exceptions import ResponseError

from coordinator.election.lease import LeaderInfo, Term, read_leader
from coordinator.election.notices import listen_for_notices
from coordinator.errors import REDIS_UNREACHABLE
from coordinator.settings import CoordinatorSettings, check_name
from coordinator.store.codec import text
from coordinator.store.connection import (
    RedisClient,
    check_client_matches,
    create_node_client,
    refresh_slot_map,
)
from coordinator.store.keys import Keys
from coordinator.store.scripts import ACQUIRE, CHECK, RELEASE, RENEW
from coordinator.tasks import cancel_and_wait

__all__ = [
    "ElectedCallback",
    "LeaderElector",
    "LeaderInfo",
    "RevokedCallback",
    "Term",
    "read_leader",
]

logger = logging.getLogger("coordinator.election")

ElectedCallback = Callable[[int], Awaitable[None] | None]
RevokedCallback = Callable[[str], Awaitable[None] | None]


async def _call(callback: Callable[..., Any], *args: Any) -> None:
    result = callback(*args)
    if inspect.isawaitable(result):
        await result


@dataclass
class ElectionStats:
    """Counters of one :class:`LeaderElector` since it was made (readers take deltas).

    ``renew_latencies`` holds the round trips (s) of recent successful renewals;
    readers drain it (it keeps the last 1,024).
    """

    terms_won: int = 0
    campaigns: int = 0
    """Attempts to take the lease (one ``acquire`` script run each)."""
    renewals: int = 0
    renew_failures: int = 0
    """Renewals that failed (Redis error) or found the lease lost."""
    renew_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


class LeaderElector:
    """Campaigns for one named lease and keeps it while it can.

    ``redis`` is used, not owned: the elector takes one dedicated connection
    from its pool for the lease (its client id identifies the holder) and one
    for release notices, and returns both on :meth:`stop`. The caller closes
    the client.

    Callbacks (sync or async) run in the elector's task, in order:
    ``on_elected(token)`` when a term starts, ``on_revoked(reason)`` when it
    ends (``"released"``, ``"lease lost"``, ``"renew deadline exceeded"``,
    ``"connection replaced"``). An exception in a callback is logged and does
    not stop the elector.
    """

    def __init__(
        self,
        redis: RedisClient,
        settings: CoordinatorSettings,
        *,
        name: str | None = None,
        on_elected: ElectedCallback | None = None,
        on_revoked: RevokedCallback | None = None,
    ) -> None:
        self.settings = settings
        self.name = check_name("election name", name or settings.election_name)
        self.keys = Keys(settings.namespace)
        if isinstance(redis, RedisCluster):
            check_client_matches("LeaderElector", redis, settings.redis_url)
        self._redis = redis
        self._conn: Redis | None = None  # the lease connection (see the module doc)
        self._node: Redis | None = None  # Cluster: the client of the slot's primary
        self._lease_key = self.keys.lease(self.name)
        self._fencing_key = self.keys.fencing(self.name)
        self._notices = self.keys.election_notices(self.name)
        self._heir_key = self.keys.heir(self.name)
        self.is_heir = False
        """This follower is the heir: it checks the holder closely (see module doc)."""
        self._on_elected: list[ElectedCallback] = [on_elected] if on_elected else []
        self._on_revoked: list[RevokedCallback] = [on_revoked] if on_revoked else []
        self._term: Term | None = None
        self._renewed_mono = 0.0
        self._client_id = 0
        self._crash_check = True
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._started = False
        self._stale_map = False  # Cluster: read the slot map before the next connection
        self._task: asyncio.Task[None] | None = None
        self._notice_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.hostname = socket.gethostname()

        self.pid = os.getpid()
        self.stats = ElectionStats()
        """What this elector counted since it was made (for metrics)."""

    # -- public state -----------------------------------------------------------
    @property
    def instance_id(self) -> str:
        return self.settings.instance_id

    @property
    def is_leader(self) -> bool:
        """Local belief, bounded in time: false once ``renew_deadline`` has passed
        since the last successful renewal started, whether or not the loop ran."""
        return (
            self._term is not None
            and time.monotonic() - self._renewed_mono < self.settings.renew_deadline
        )

    @property
    def term(self) -> Term | None:
        """The current term while :attr:`is_leader`, else ``None``."""
        return self._term if self.is_leader else None

    @property
    def lease_remaining(self) -> float:
        """Seconds until this leader's lease expires on the server at the latest
        (lease TTL from the start of the last successful renewal); 0 when not leading."""
        if not self.is_leader:
            return 0.0
        return max(0.0, self.settings.lease_ttl - (time.monotonic() - self._renewed_mono))

    @property
    def token(self) -> int | None:
        term = self.term
        return term.token if term else None

    def add_observer(
        self,
        on_elected: ElectedCallback | None = None,
        on_revoked: RevokedCallback | None = None,
    ) -> None:
        """Register more callbacks (see the class docstring)."""
        if on_elected:
            self._on_elected.append(on_elected)
        if on_revoked:
            self._on_revoked.append(on_revoked)

    async def check(self) -> bool:
        """Ask Redis whether this process's term is still the current one.

        This is the server-side check: it is false for a paused old leader even
        before its own loop noticed. Raises ``redis`` errors if Redis is down.
        """
        term = self._term
        if term is None:
            return False
        return bool(await CHECK(self._redis, [self._lease_key], [term.lease_value]))

    async def leader(self) -> LeaderInfo | None:
        """Who leads this election now, read from Redis."""
        return await read_leader(self._redis, self.keys, self.name)

    async def wait_for_leadership(self, timeout: float | None = None) -> Term:
        """Wait until this process leads; raises ``TimeoutError`` after ``timeout``."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: self.is_leader)
        assert self._term is not None
        return self._term

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        """Start campaigning in background tasks. Idempotent."""
        if self._task is not None:
            return
        self._stopping.clear()
        self._started = True
        self._task = asyncio.create_task(self._run(), name=f"elector:{self.name}")
        self._notice_task = asyncio.create_task(
            listen_for_notices(
                self._redis,
                self._notices,
                self._on_notice,
                backoff_cap=self.settings.backoff_max_ms / 1000,
                who=self.instance_id,
            ),
            name="elector-notices",
        )

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; if leading, end the term (callbacks first), then release.

        With ``release=False`` the lease is left to expire (for tests that
        simulate a crash without killing the process).
        """
        if self._task is None:
            return
        self._stopping.set()
        self._wake.set()
        for task in (self._task, self._notice_task):
            await cancel_and_wait(task)
        self._task = self._notice_task = None
        if self._term is not None:
            await self._end_term("released", release=release)
        elif self.is_heir and release:
            await self._resign_heir()
        await self._close_connection()
        self._started = False

    async def __aenter__(self) -> LeaderElector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the loop ---------------------------------------------------------------
    async def _run(self) -> None:
        backoff = FullJitterBackoff(cap=self.settings.backoff_max_ms / 1000, base=0.1)
        failures = 0
        while not self._stopping.is_set():
            try:
                if self._term is None:
                    await self._campaign()
                else:
                    await self._hold()
                if failures:
                    logger.info("%s: Redis reachable again", self.instance_id)
                failures = 0
            except asyncio.CancelledError:
                raise
            except REDIS_UNREACHABLE as exc:
                self._client_id = 0  # the connection may come back as a new client
                if isinstance(self._redis, RedisCluster):
                    await self._close_connection()  # the slot may have a new primary
                    self._stale_map = True
                delay = backoff.compute(min(failures, 16))
                failures += 1
                logger.warning(
                    "%s: election %r: Redis error (%s: %s); retrying in %.2fs",
                    self.instance_id,
                    self.name,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                if self._term is not None:
                    self.stats.renew_failures += 1
                    await self._step_down_if_expired()
                    delay = min(delay, self._time_to_deadline())
                await self._sleep(max(delay, 0.0))
            except Exception:
                logger.exception("%s: election loop error", self.instance_id)
                await self._sleep(self.settings.retry_period)

    async def _campaign(self) -> None:
        self._wake.clear()  # a notice that arrives from here on cuts the wait short
        conn = await self._connection()
        started = time.monotonic()
        # The lease names the connection that renews it. Its id is cached (one
        # round trip less per follower tick) and checked again after winning: a
        # connection that reconnected meanwhile has a new id.
        if not self._client_id:
            self._client_id = int(await conn.client_id())
        client_id = self._client_id
        won, value, *role = await ACQUIRE(
            conn,
            [self._lease_key, self._fencing_key, self._heir_key],
            [
                self.settings.lease_ttl_ms,
                self.instance_id,
                self.hostname,
                self.pid,
                client_id,
                self._heir_value,
                2 * self.settings.retry_period_ms,
                self._notices,
            ],
        )
        self.stats.campaigns += 1
        self.is_heir = not won and role == [1]
        if won:
            value_s = text(value)
            info = json.loads(value_s)
            self._client_id = int(await conn.client_id())
            if self._client_id != client_id:
                # Our connection was replaced between the two commands: the lease
                # names a dead client. Give it back and try again at once.
                await RELEASE(conn, [self._lease_key], [value_s, self._notices, "retry"])
                return
            self._renewed_mono = started  # the term's clock starts before the SET
            await self._begin_term(Term(int(info["fencing_token"]), value_s, client_id))
            return
        if self.is_heir and self._crash_check and await self._holder_is_gone(conn, value):
            return  # lease deleted: campaign again immediately
        await self._sleep(self._retry_delay())

    async def _resign_heir(self) -> None:
        """Give up the heir role on stop, so another follower takes it at once."""
        self.is_heir = False
        try:
            async with asyncio.timeout(self.settings.retry_period):
                await RELEASE(
                    self._redis, [self._heir_key], [self._heir_value, self._notices, "heir vacant"]
                )
        except REDIS_UNREACHABLE as exc:
            logger.info("%s: could not resign as heir (%s); it expires", self.instance_id, exc)

    async def _holder_is_gone(self, conn: Redis, value: bytes) -> bool:
        try:
            holder = json.loads(value)
            client_id = int(holder["client_id"])
        except (ValueError, KeyError, TypeError):
            return False
        try:
            listing = await conn.execute_command(  # type: ignore[no-untyped-call]
                "CLIENT", "LIST", "ID", client_id
            )
        except ResponseError as exc:
            logger.warning(
                "%s: CLIENT LIST not permitted (%s); crash detection off, relying on the TTL",
                self.instance_id,
                exc,
            )
            self._crash_check = False
            return False
        if listing:
            return False
        deleted = await RELEASE(conn, [self._lease_key], [value, self._notices, "holder gone"])
        if deleted:
            logger.info(
                "%s: holder %s (token %s) lost its Redis connection; taking over",
                self.instance_id,
                holder.get("instance_id"),
                holder.get("fencing_token"),
            )
        return bool(deleted)

    async def _hold(self) -> None:
        term = self._term
        assert term is not None
        self._wake.clear()
        await self._sleep(
            min(
                self.settings.renew_interval - (time.monotonic() - self._renewed_mono),
                self._time_to_deadline(),
            )
        )
        if self._stopping.is_set():
            return
        if await self._step_down_if_expired():
            return
        started = time.monotonic()
        async with asyncio.timeout(max(0.01, self._time_to_deadline())):
            conn = await self._connection()  # on Cluster it may read the slot map first
            renewed = await RENEW(
                conn,
                [self._lease_key, self._heir_key],
                [term.lease_value, self.settings.lease_ttl_ms, self._notices],
            )
            client_id = int(await conn.client_id())
        if not renewed:
            self.stats.renew_failures += 1
            await self._end_term("lease lost", release=False)
        elif client_id != term.client_id:
            await self._end_term("connection replaced", release=True)
        else:
            self._renewed_mono = started
            self.stats.renewals += 1
            self.stats.renew_latencies.append(time.monotonic() - started)

    # -- terms ------------------------------------------------------------------
    async def _begin_term(self, term: Term) -> None:
        self._term = term
        self.stats.terms_won += 1
        logger.info(
            "%s: elected leader of %r, fencing token %d", self.instance_id, self.name, term.token
        )
        for callback in list(self._on_elected):
            try:
                await _call(callback, term.token)
            except Exception:
                logger.exception("%s: on_elected callback failed", self.instance_id)
        await self._notify()

    async def _end_term(self, reason: str, *, release: bool) -> None:
        term, self._term = self._term, None
        if term is None:
            return
        logger.warning(
            "%s: stepped down from %r (token %d): %s",
            self.instance_id,
            self.name,
            term.token,
            reason,
        )
        for callback in list(self._on_revoked):
            try:
                await _call(callback, reason)
            except Exception:
                logger.exception("%s: on_revoked callback failed", self.instance_id)
        await self._notify()
        if release:
            try:
                async with asyncio.timeout(self.settings.retry_period):
                    await RELEASE(
                        self._redis, [self._lease_key], [term.lease_value, self._notices, reason]
                    )
            except REDIS_UNREACHABLE as exc:
                logger.info(
                    "%s: could not release the lease (%s); it will expire", self.instance_id, exc
                )

    async def _step_down_if_expired(self) -> bool:
        if self._term is not None and self._time_to_deadline() <= 0:
            await self._end_term("renew deadline exceeded", release=True)
            return True
        return False

    def _time_to_deadline(self) -> float:
        return self.settings.renew_deadline - (time.monotonic() - self._renewed_mono)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- helpers ----------------------------------------------------------------
    async def _connection(self) -> Redis:
        """The lease connection, made on first use: a dedicated connection of the
        client on one node; on Cluster, one to the primary of the election's slot
        (from a slot map read again after any error, see ``_run``)."""
        if not self._started:
            raise RuntimeError("LeaderElector is not started")
        if self._conn is None:
            if isinstance(self._redis, RedisCluster):
                # Bounded: a node that stopped answering must not hold the loop. Shielded:
                # redis-py closes every connection of the client if its start is cancelled.
                refresh = refresh_slot_map if self._stale_map else RedisCluster.initialize
                async with asyncio.timeout(max(1.0, self.settings.retry_period)):
                    await asyncio.shield(refresh(self._redis))
                self._stale_map = False
                node = self._redis.get_node_from_key(self._lease_key)
                assert node is not None  # get_node_from_key raises for an uncovered slot
                self._node = create_node_client(
                    self.settings.redis_url, node.host, int(node.port), max_connections=1
                )
                self._conn = self._node.client()
            else:
                self._conn = self._redis.client()
        return self._conn

    async def _close_connection(self) -> None:
        """Close the lease connection (and on Cluster its node's pool), to completion
        even if the caller is cancelled meanwhile; the next one has a new client id."""
        closing = [c for c in (self._conn, self._node) if c is not None]
        self._conn = self._node = None
        self._client_id = 0

        async def close() -> None:
            for client in closing:
                with contextlib.suppress(Exception):
                    await client.aclose()

        if closing:
            await asyncio.shield(close())

    @property
    def _heir_value(self) -> str:
        return json.dumps(
            {"instance_id": self.instance_id, "hostname": self.hostname}, separators=(",", ":")
        )

    def _retry_delay(self) -> float:
        """The heir checks 4 times per retry period, the others once per 10 (notices
        wake them at once); a little jitter spreads the checks out."""
        period = self.settings.retry_period * (0.25 if self.is_heir else 10.0)
        return period * random.uniform(0.8, 1.0)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early on a release notice (cleared by the caller)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._wake.wait()

    def _on_notice(self, data: bytes) -> None:
        if self._term is None:
            self._wake.set()  # the holder released: campaign now, not at the next tick
