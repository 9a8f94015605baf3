"""EventRelay: publish events to every process, fan them out to local subscribers, replay.

How an event travels:

1. :meth:`EventRelay.publish` validates it and runs one Lua script: ``XADD``
   to the channel's stream (``MAXLEN ~ relay_history``; the key expires
   ``relay_stream_ttl_s`` after the last publish) and ``PUBLISH`` of an
   envelope carrying the new stream id on the channel's own Pub/Sub channel
   (``Keys.channel_events``).
2. Every process holds exactly one Pub/Sub connection (the *listener*). It is
   subscribed to a relay channel's Pub/Sub channel while the process has at
   least one local subscriber of it, and unsubscribes when the last one leaves;
   so Redis sends an event only to the processes that have someone to give it
   to, and ``PUBSUB NUMSUB`` shows who listens. For each message the listener
   builds the SSE bytes once and hands the same object to every local
   :class:`Subscription` of the event's channel.
3. A new subscriber is registered first (live frames are held aside); when
   its channel is new to the process, the listener subscribes and the
   subscriber waits for Redis to confirm it. Only then does it read the stream
   (its tip, or the events after ``last_event_id``) and go live; duplicates are
   dropped by id. So an event is either in that read or arrives live: no gap,
   no duplicate, whatever the races between subscribers joining and leaving.

Guarantees:

- Per channel, a subscriber receives events in stream-id order, each once.
- The listener is supervised: when its connection drops (Redis restart,
  ``CLIENT KILL``, network) or stops answering PINGs for
  ``2 * relay_keepalive_s``, it reconnects with capped exponential backoff and
  full jitter, resubscribes, and backfills every local subscriber from the
  streams after the last id it queued. Each recovery adds one to
  ``EventRelay.stats.reconnects``; :attr:`EventRelay.ready` is false meanwhile.
- A subscriber whose id is older than the retained history (or unknown to
  this Redis) first receives an event ``reset``. So does one whose channel's stream
  Redis lost since its last event (gone or recreated, which the stream's idle expiry
  cannot explain: a restart without persistence, a ``DEL``), found by the backfill
  after the listener reconnects: an event acknowledged just before the loss may never
  have been heard (:meth:`~coordinator.relay.history.ReplayResult.lost_after`).
- Internal consumers of other Pub/Sub channels (shared state) ride on the same
  listener connection and its supervision (:meth:`EventRelay.watch`,
  :mod:`coordinator.relay.watchers`).

Redis Cluster (``redis+cluster://``): a channel's stream and its shard channel
share a slot of their own (:class:`~coordinator.store.keys.Keys` ``sharded``), the
publish script ``SPUBLISH``es, and the listener holds one connection per shard
primary, each ``SSUBSCRIBE``d to the watched channels of its slots. A shard's
connection dropping, a failover, or Redis unsubscribing a shard channel because its
slot moved, all count as a drop of the listener: every connection is made again from
a fresh slot map, resubscribed and backfilled, as above. Needs Redis 7 or newer
(Sharded Pub/Sub); an older server is a ``ConfigurationError``, and the listener
stops with that message as its :attr:`EventRelay.status`.

Limits:

- The first subscriber of a channel new to the process waits one round trip
  to Redis (the SUBSCRIBE) before its replay read; later ones do not. Changes
  made in one pass of the event loop go out as one SUBSCRIBE and one
  UNSUBSCRIBE, and a channel left and rejoined within it costs nothing.
- On Cluster, any shard's drop costs every channel a backfill read (one per channel
  with local subscribers), not only the channels of that shard.
- Rolling updates from a version that published every event on one
  namespace channel (``Keys.events``): the listener also hears that channel,
  and :meth:`EventRelay.publish` publishes there too while a listener of the
  older version is subscribed (counted in the publish script), so events
  cross between versions both ways; duplicates are dropped by id.
- History is what the stream retains: about ``relay_history`` events per
  channel, and nothing of what a Redis restart without persistence lost. A
  subscriber that had seen no event of its channel (its stream did not exist) gets
  no ``reset`` for what such a restart lost, nor one whose stream went idle past
  ``relay_stream_ttl_s`` before the loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import FullJitterBackoff, NoBackoff
from redis.exceptions import NoPermissionError

from coordinator.errors import (
    REDIS_UNREACHABLE,
    ConfigurationError,
    InvalidEventError,
    RedisUnavailableError,
)
from coordinator.relay.events import (
    EventId,
    check_channel,
    decode_envelope,
    parse_event_id,
    reset_frame,
    sse_frame,
    validate_event,
)
from coordinator.relay.history import ReplayResult, read_history
from coordinator.relay.stats import RelayStats
from coordinator.relay.subscription import Subscription
from coordinator.relay.watchers import ChannelWatcher
from coordinator.settings import CoordinatorSettings
from coordinator.store.codec import text
from coordinator.store.connection import (
    PrimaryClients,
    check_client_matches,
    create_client,
    create_node_client,
    create_redis,
    is_cluster_url,
    refresh_slot_map,
)
from coordinator.store.keys import Keys
from coordinator.store.scripts import PUBLISH
from coordinator.tasks import cancel_and_wait

logger = logging.getLogger("coordinator.relay")

_YIELD_EVERY = 16  # messages handled before giving consumers a turn on the loop
_SYNC_BATCH = 1000  # channels per SUBSCRIBE / UNSUBSCRIBE command
_SHARDED_PUBSUB_MAJOR = 7  # SSUBSCRIBE / SPUBLISH


def sharded_pubsub_error(version: str, where: str) -> ConfigurationError | None:
    """The error to raise when a cluster node runs a Redis without Sharded Pub/Sub."""
    major = version.split(".", 1)[0]
    if major.isdigit() and int(major) >= _SHARDED_PUBSUB_MAJOR:
        return None
    return ConfigurationError(
        f"Redis at {where} is version {version}: the event relay on Redis Cluster needs "
        "Redis 7 or newer (Sharded Pub/Sub, SSUBSCRIBE/SPUBLISH); upgrade the cluster, or "
        "use a single Redis or Sentinel URL"
    )


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class _Link:
    """One Pub/Sub connection of the listener: the only one on a single Redis or
    Sentinel; one per shard primary on Redis Cluster, where relay channels are shard
    channels (``SSUBSCRIBE`` takes the channels of one slot: each has its own)."""

    __slots__ = ("client", "node", "pubsub", "sharded")

    def __init__(self, pubsub: PubSub, node: str, client: Redis | None = None) -> None:
        self.pubsub = pubsub
        self.node = node
        self.client = client  # owned (closed with the link): a shard's node client
        self.sharded = client is not None

    async def join(self, names: list[str]) -> None:
        await self._send(self.pubsub.ssubscribe if self.sharded else self.pubsub.subscribe, names)

    async def leave(self, names: list[str]) -> None:
        await self._send(
            self.pubsub.sunsubscribe if self.sharded else self.pubsub.unsubscribe, names
        )

    async def _send(self, command: Callable[..., Awaitable[Any]], names: list[str]) -> None:
        if not self.sharded:
            await command(*names)
            return
        for name in names:  # one slot per command
            await command(name)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pubsub.aclose(), 2)  # type: ignore[no-untyped-call]
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.aclose(), 2)


class EventRelay:
    """Cross-process events with local fan-out and replay, over one Redis.

    Args:
        settings: namespace, Redis URL and the ``relay_*`` limits.
        redis: the client for publishing and replay reads (a ``RedisCluster`` when
            ``settings.redis_url`` is a cluster URL). A client passed in
            is not closed by the relay; when omitted, one is created from
            ``settings.redis_url`` and closed by :meth:`stop`. The Pub/Sub
            listener always uses its own connections (from ``settings.redis_url``),
            with redis-py's silent retries turned off so every drop is seen,
            counted and backfilled.

    Raises:
        ConfigurationError: ``redis`` is a cluster client and the URL not a cluster
            URL, or the other way round.

    Lifecycle: ``await relay.start()`` launches the listener (it does not
    wait for Redis; see :meth:`wait_ready`); ``await relay.stop()`` ends every
    subscription (their streams finish) and closes connections. ``publish``
    works without ``start``.

    Counters, for metrics: :attr:`stats` (a :class:`RelayStats`).
    """

    def __init__(
        self, settings: CoordinatorSettings, redis: Redis | RedisCluster | None = None
    ) -> None:
        self.settings = settings
        cluster = is_cluster_url(settings.redis_url)
        if redis is not None:
            check_client_matches("EventRelay", redis, settings.redis_url)
        self.keys = Keys(settings.namespace, sharded=cluster)
        self._redis = redis if redis is not None else create_client(settings.redis_url)
        self._owns_redis = redis is None
        self._listen_redis: Redis | None = None
        self._links: dict[str, _Link] = {}  # the listener's connections, by node
        self._link_of: dict[str, _Link] = {}  # where each channel of _sent was subscribed
        self._leaving: dict[str, int] = {}  # our SUNSUBSCRIBEs not yet confirmed
        self._primaries = PrimaryClients(self._redis, settings.redis_url)  # publish + WAIT
        self._version_checked = not cluster
        self._version_lock = asyncio.Lock()  # concurrent first publishes check once
        self._subs: dict[str, set[Subscription]] = {}
        self._watchers: dict[bytes, ChannelWatcher] = {}
        self._snapshots: dict[tuple[str, int], asyncio.Future[ReplayResult]] = {}
        # Per-channel subscriptions of the current listener connection (see _sync):
        self._sent: set[str] = set()  # channels whose last command sent is SUBSCRIBE
        self._awaiting: dict[str, int] = {}  # SUBSCRIBE confirmations still due
        self._waiters: dict[str, asyncio.Future[None]] = {}  # first subscribers waiting
        self._dirty: set[str] = set()  # channels gained or lost since the last sync
        self._changed = asyncio.Event()
        self._tips: dict[str, EventId] = {}  # last event routed, by channel with subs
        self._generation: dict[str, int] = {}  # which SUBSCRIBE of a channel is current
        self._subscribes = 0  # SUBSCRIBEs sent by this relay, for _generation
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._epoch = 0
        self._state = "not started"
        self._stopping = False
        self.stats = RelayStats()
        """What this relay counted since it was made (for metrics)."""

    @property
    def redis(self) -> Redis | RedisCluster:
        """The client this relay publishes and replays with (not its listener's)."""
        return self._redis

    # -- publishing ---------------------------------------------------------------
    async def publish(self, channel: str, data: Any, event: str = "message") -> str:
        """Append an event to ``channel`` and broadcast it; returns its id (``"ms-seq"``).

        Raises:
            InvalidEventError: bad channel or event name, data not JSON-serialisable.
            EventTooLargeError: over ``relay_max_event_bytes``.
            RedisUnavailableError: Redis could not be reached; nothing was published.
            ConfigurationError: a Redis Cluster node is older than Redis 7.
        """
        keys, args = self.publish_call(channel, data, event)
        replicas = self.settings.min_replicas
        try:
            if not self._version_checked:
                await self._check_cluster_version()
            if replicas:
                raw, confirmed = await PUBLISH.call_replicated(
                    await self._primaries.client_for(keys[0]),
                    keys,
                    args,
                    replicas,
                    self.settings.replica_timeout_ms,
                )
            else:
                raw, confirmed = await PUBLISH(self._redis, keys, args), 0
        except REDIS_UNREACHABLE as exc:
            if replicas:
                await self._primaries.forget()
            # A script's ACL denial is a plain ResponseError naming no ACL; nothing was
            # written (the script checks first), so say what to change.
            denied = isinstance(exc, NoPermissionError) or "can't run this command" in str(exc)
            hint = "; the Redis user needs the README's ACL line" if denied else ""
            raise RedisUnavailableError(f"could not publish to {channel!r}: {exc}{hint}") from exc
        if confirmed < replicas:
            # Live subscribers of this primary may have it; a failover may lose it. The
            # caller retries (at least once), rather than trust an ack a failover can undo.
            raise RedisUnavailableError(
                f"publish to {channel!r} reached the primary but {confirmed} of {replicas} "
                "replicas confirmed it (COORDINATOR_MIN_REPLICAS); retry"
            )
        self.stats.events_published += 1
        return text(raw)

    def publish_call(
        self, channel: str, data: Any, event: str = "message"
    ) -> tuple[list[str], list[str | int]]:
        """The keys and arguments of the publish script for this event (validated as by
        :meth:`publish`), for callers that must run it inside their own transaction."""
        encoded = validate_event(channel, data, event, self.settings.relay_max_event_bytes)
        keys = [self.keys.stream(channel)]
        args: list[str | int] = [
            self.keys.events(),
            channel,
            event,
            encoded.data_json,
            self.settings.relay_history,
            self.settings.relay_stream_ttl_s,
            self.keys.channel_events(channel),
            self.keys.relay_listeners(),
            int(self.keys.sharded),
        ]
        return keys, args

    async def _check_cluster_version(self) -> None:
        """Before the first publish on Cluster: every primary runs Redis 7+ (else the
        script would append the event and then fail on SPUBLISH)."""
        assert isinstance(self._redis, RedisCluster)
        async with self._version_lock:
            if not self._version_checked:
                await self._check_primaries(self._redis)

    async def _check_primaries(self, cluster: RedisCluster) -> None:
        replies = await cluster.info("server", target_nodes=RedisCluster.PRIMARIES)
        for node, info in replies.items() if "redis_version" not in replies else [("", replies)]:
            error = sharded_pubsub_error(str(info["redis_version"]), node or "the cluster")
            if error is not None:
                raise error
        self._version_checked = True

    # -- subscribing --------------------------------------------------------------
    async def subscribe(
        self, channel: str, last_event_id: str | EventId | None = None
    ) -> Subscription:
        """A live subscription to ``channel``, after replaying from ``last_event_id``.

        Without ``last_event_id`` the subscription starts with the next event.
        With it, it first yields every retained event after that id (preceded
        by a ``reset`` event when some were trimmed, or the id is unknown),
        then live ones, with no gap and no duplicate.

        Raises:
            InvalidEventError: ``channel`` breaks the channel name rule.
            InvalidEventIdError: ``last_event_id`` is not ``"<ms>-<seq>"``.
            RedisUnavailableError: the listener is not subscribed to the channel
                within ``relay_subscribe_timeout_s``, or the replay read failed.
        """
        check_channel(channel)
        after = parse_event_id(last_event_id) if isinstance(last_event_id, str) else last_event_id
        timeout = self.settings.relay_subscribe_timeout_s
        await self.wait_ready(timeout)
        sub = Subscription(
            channel, self.settings.relay_client_queue, stats=self.stats, on_discard=self._discard
        )
        sub.last_id = after
        subs = self._subs.get(channel)
        if subs is None:
            subs = self._subs[channel] = set()
            self._want(channel)
        subs.add(sub)
        # Events routed to this channel's other subscribers before this one existed are
        # behind its start, even when it shares a snapshot read begun before them.
        floor = self._tips.get(channel)
        try:
            while sub.closed is None:  # closed meanwhile (shutdown, overflow): return it
                await self._heard(channel, timeout)
                epoch = self._epoch
                await self._replay(sub, snapshot=sub.last_id is None)
                if floor is not None and after is None:
                    sub.last_id = max(floor, sub.last_id or floor)
                if self._epoch == epoch and self._ready.is_set():
                    break  # the listener did not drop meanwhile (else: read again)
            sub.go_live()
        except BaseException:
            sub.close("closed")
            raise
        return sub

    async def _replay(self, sub: Subscription, snapshot: bool) -> None:
        """Read the stream after ``sub``'s cursor into it (``snapshot``: only learn the tip)."""
        after = sub.cursor
        while True:
            if snapshot:
                result = await self._snapshot(sub.channel)
                sub.last_id = result.last_generated or EventId(0, 0)
                return
            result = await self._read(sub.channel, after, None)
            assert after is not None
            reason = result.lost_after(after, self.settings.relay_stream_ttl_s)
            reset = reset_frame(after, reason) if reason else None
            if reason == "unknown-id" and result.last_generated is not None:
                sub.last_id = after = result.last_generated
            sub.add_replayed(result.entries, reset)
            if len(result.entries) < self._page:
                return
            after = result.entries[-1][0]

    async def _snapshot(self, channel: str) -> ReplayResult:
        """The channel's tip; concurrent new subscribers of a channel share one read
        (a connection storm costs one Redis command per channel, not one per client).

        Only reads begun under the channel's current SUBSCRIBE are shared: one begun
        before an UNSUBSCRIBE could miss events published while it was unsubscribed."""
        key = (channel, self._generation.get(channel, 0))
        pending = self._snapshots.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._read(channel, None, 0))
            self._snapshots[key] = pending
            pending.add_done_callback(lambda _: self._snapshots.pop(key, None))
        return await asyncio.shield(pending)

    @property
    def _page(self) -> int:
        return self.settings.relay_history + 1000

    async def _read(self, channel: str, after: EventId | None, count: int | None) -> ReplayResult:
        return await read_history(
            self._redis,
            self.keys.stream(channel),
            channel,
            after,
            self._page if count is None else count,
        )

    def _discard(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.channel]
                self._tips.pop(sub.channel, None)
                self._wake(sub.channel)  # a waiter left is of a closed subscription
                self._want(sub.channel)

    # -- per-channel subscriptions ---------------------------------------------------
    def _want(self, channel: str) -> None:
        """The channel gained its first local subscriber or lost its last: sync soon."""
        self._dirty.add(channel)
        self._changed.set()

    async def _heard(self, channel: str, timeout: float) -> None:
        """Wait until the listener's subscription to ``channel`` is confirmed by Redis."""
        if self._ready.is_set() and channel in self._sent and channel not in self._awaiting:
            return
        if self._stopping or self._task is None or self._task.done():
            raise RedisUnavailableError(f"event relay is not running ({self._state})")
        waiter = self._waiters.get(channel)
        if waiter is None:
            waiter = self._waiters[channel] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise RedisUnavailableError(
                f"event relay could not subscribe to channel {channel!r} ({self._state}); "
                "retry shortly"
            ) from None

    def _confirmed(self, channel: str) -> None:
        """Redis confirmed one SUBSCRIBE of ``channel`` on the current connection."""
        due = self._awaiting.get(channel, 0) - 1
        if due > 0:
            self._awaiting[channel] = due
            return
        self._awaiting.pop(channel, None)
        if channel in self._sent:
            self._wake(channel)

    def _wake(self, channel: str) -> None:
        waiter = self._waiters.pop(channel, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _sync(self) -> None:
        """Keep the listener subscribed to exactly the channels with local subscribers.

        Runs beside the readers, on the same connections (commands go out, replies come
        back to the readers in order). A channel's waiters wake at the confirmation of
        the last SUBSCRIBE sent for it, so a SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE race
        cannot wake them early.
        """
        while True:
            await self._changed.wait()
            self._changed.clear()
            dirty, self._dirty = self._dirty, set()
            add = [c for c in dirty if c in self._subs and c not in self._sent]
            drop = [c for c in dirty if c not in self._subs and c in self._sent]
            for i in range(0, len(add), _SYNC_BATCH):
                for link, batch in self._by_link(add[i : i + _SYNC_BATCH]).items():
                    self._subscribing(batch, link)
                    for channel in batch:
                        self._awaiting[channel] = self._awaiting.get(channel, 0) + 1
                    await link.join([self.keys.channel_events(c) for c in batch])
            for i in range(0, len(drop), _SYNC_BATCH):
                gone: dict[_Link, list[str]] = {}
                for channel in drop[i : i + _SYNC_BATCH]:
                    if channel in self._subs:
                        continue  # joined again meanwhile
                    link = self._link_of.pop(channel)
                    self._sent.discard(channel)
                    self._generation.pop(channel, None)
                    if link.sharded:  # its confirmation is ours, not a slot move
                        self._leaving[channel] = self._leaving.get(channel, 0) + 1
                    gone.setdefault(link, []).append(channel)
                for link, batch in gone.items():
                    await link.leave([self.keys.channel_events(c) for c in batch])

    def _by_link(self, channels: list[str]) -> dict[_Link, list[str]]:
        """``channels`` grouped by the connection serving their slot.

        Raises:
            ConnectionError: on Cluster, a slot is served by a node the listener has no
                connection to (the map changed): the listener reconnects.
        """
        if not isinstance(self._redis, RedisCluster):
            return {self._links[""]: channels} if channels else {}
        groups: dict[_Link, list[str]] = {}
        for channel in channels:
            node = self._primaries.primary_of(self.keys.channel_events(channel))
            link = self._links.get(node.name)
            if link is None:
                raise ConnectionError(
                    f"the slot of channel {channel!r} is now served by {node.name}, "
                    "which the listener has no connection to; reconnecting"
                )
            groups.setdefault(link, []).append(channel)
        return groups

    def _subscribing(self, channels: list[str], link: _Link) -> None:
        """A SUBSCRIBE of ``channels`` is about to go out on ``link``: each starts a new
        generation (snapshot reads are shared only within one)."""
        self._sent.update(channels)
        for channel in channels:
            self._link_of[channel] = link
            self._subscribes += 1
            self._generation[channel] = self._subscribes

    def watch(self, channel: str, watcher: ChannelWatcher) -> None:
        """Also listen to the Pub/Sub ``channel`` (a full Redis channel name) on this
        relay's listener, for ``watcher`` (see :mod:`coordinator.relay.watchers`).

        Raises:
            RuntimeError: the listener is already running (watch before :meth:`start`),
                or the channel is already watched.
        """
        if self._task is not None:
            raise RuntimeError("EventRelay.watch() must be called before start()")
        name = channel.encode("utf-8")
        if (
            name in self._watchers
            or channel in (self.keys.events(), self.keys.relay_listeners())
            or self.keys.events_channel_of(name) is not None
        ):
            raise RuntimeError(f"channel {channel!r} is already watched")
        self._watchers[name] = watcher

    # -- state ----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True while the listener is subscribed (live events are flowing)."""
        return self._ready.is_set()

    @property
    def status(self) -> str:
        """``"subscribed"``, or why not: ``"not started"``, ``"connecting"``, ``"down: ..."``."""
        return self._state

    def channel_subscribers(self) -> dict[str, int]:
        """Local subscriptions open now, by channel."""
        return {channel: len(subs) for channel, subs in self._subs.items()}

    @property
    def subscribers(self) -> int:
        """Local subscriptions open now."""
        return sum(len(s) for s in self._subs.values())

    async def wait_ready(self, timeout: float) -> None:
        """Wait until :attr:`ready`; raise ``RedisUnavailableError`` after ``timeout`` s."""
        if self._ready.is_set():
            return
        if self._task is None or self._task.done() or self._stopping:
            raise RedisUnavailableError(f"event relay is not running ({self._state})")
        ready = asyncio.ensure_future(self._ready.wait())
        try:  # the listener failing for good ends the wait too
            await asyncio.wait(
                {ready, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        if not self._ready.is_set():
            raise RedisUnavailableError(
                f"event relay is not subscribed to Redis ({self._state}); retry shortly"
            )

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Start the supervised listener; returns at once (see :meth:`wait_ready`)."""
        if self._task is not None:
            return
        self._stopping = False
        self._state = "connecting"
        if not self.keys.sharded:
            self._listen_redis = create_redis(self.settings.redis_url, **self._listener_options())
        self._task = asyncio.create_task(self._supervise(), name="coordinator-relay-listener")

    async def stop(self) -> None:
        """End every subscription (streams finish), stop the listener, close connections."""
        self._stopping = True
        self._ready.clear()
        self._fail_waiters(RedisUnavailableError("event relay stopped"))
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close("shutdown")
        await cancel_and_wait(self._task)
        self._task = None
        links, self._links = self._links, {}
        for link in links.values():  # left when a repeated cancel cut the listener's cleanup
            await link.close()
        if self._listen_redis is not None:
            await self._listen_redis.aclose()
            self._listen_redis = None
        await self._primaries.aclose()
        if self._owns_redis:
            await self._redis.aclose()
        self._state = "stopped"

    def _fail_waiters(self, error: RedisUnavailableError) -> None:
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved: a waiter may have given up already
        self._waiters.clear()

    # -- the listener ---------------------------------------------------------------
    def _listener_options(self) -> dict[str, Any]:
        """The listener's connections: no silent retries (every drop is seen, counted
        and backfilled), no health checks of redis-py's own, named for CLIENT LIST."""
        name = f"coordinator-relay:{self.settings.instance_id}"[:120].replace(" ", "_")
        return {"retry": Retry(NoBackoff(), 0), "health_check_interval": 0, "client_name": name}

    async def _supervise(self) -> None:
        failures = 0
        backoff = FullJitterBackoff(cap=self.settings.backoff_max_ms / 1000, base=0.05)
        while not self._stopping:
            epoch = self._epoch
            try:
                await self._listen(reconnecting=epoch > 0)
            except asyncio.CancelledError:
                raise
            except ConfigurationError as exc:  # retrying cannot help: say so and stop
                self._state = f"failed: {exc}"
                logger.error("relay listener of %s stopped: %s", self.settings.instance_id, exc)
                self._fail_waiters(RedisUnavailableError(f"event relay failed: {exc}"))
                for subs in list(self._subs.values()):
                    for sub in list(subs):
                        sub.close("shutdown")  # streams end: clients reconnect elsewhere
                return
            except Exception as exc:
                self._state = f"down: {type(exc).__name__}: {exc}"
                failures = 1 if self._epoch != epoch else failures + 1  # was it up meanwhile?
                delay = backoff.compute(min(failures, 16))
                logger.warning(
                    "relay listener of %s lost Redis (%s); reconnecting in %.2fs (failure %d)",
                    self.settings.instance_id,
                    exc,
                    delay,
                    failures,
                )
                await asyncio.sleep(delay)

    async def _connect(self) -> dict[str, _Link]:
        """The listener's connections: one on a single Redis or Sentinel; on Cluster, one
        per primary of a freshly read slot map, each checked to run Redis 7+."""
        if not isinstance(self._redis, RedisCluster):
            assert self._listen_redis is not None
            return {"": _Link(self._listen_redis.pubsub(), "")}
        await refresh_slot_map(self._redis)
        links: dict[str, _Link] = {}
        try:
            for node in self._redis.get_primaries():
                client = create_node_client(
                    self.settings.redis_url, node.host, int(node.port), **self._listener_options()
                )
                links[node.name] = _Link(client.pubsub(), node.name, client)
                info = await client.info("server")
                error = sharded_pubsub_error(str(info["redis_version"]), node.name)
                if error is not None:
                    raise error
        except BaseException:
            for link in links.values():
                await link.close()
            raise
        return links

    async def _listen(self, reconnecting: bool) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.suspend()  # hold live frames until the backfill below has run
        self._links = await self._connect()
        backfill: asyncio.Task[None] | None = None
        tasks: set[asyncio.Task[None]] = set()
        keepalive = self.settings.relay_keepalive_s
        lost = "relay stopped"
        try:
            wanted = list(self._subs)
            self._dirty.clear()
            expected: dict[_Link, int] = {}  # subscribe confirmations due, per link
            for index, link in enumerate(self._links.values()):
                # Every connection holds the marker, so it is never idle of channels;
                # the first also carries the watchers' channels and, on a single Redis,
                # the namespace channel of older versions.
                fixed: list[str | bytes] = [self.keys.relay_listeners()]
                if not link.sharded:
                    fixed.append(self.keys.events())
                if index == 0:
                    fixed += self._watchers
                await link.pubsub.subscribe(*fixed)
                expected[link] = len(fixed)
            groups = self._by_link(wanted)
            for link, channels in groups.items():
                self._subscribing(channels, link)
                for i in range(0, len(channels), _SYNC_BATCH):
                    batch = channels[i : i + _SYNC_BATCH]
                    await link.join([self.keys.channel_events(c) for c in batch])
            for link, fixed_count in expected.items():
                count = fixed_count + len(groups.get(link, ()))
                await self._confirm(link, max(5.0, keepalive), count)
            self._epoch += 1
            self._notify_watchers("subscribed")
            if reconnecting:
                self.stats.reconnects += 1
                logger.warning(
                    "relay listener of %s resubscribed (reconnect %d)",
                    self.settings.instance_id,
                    self.stats.reconnects,
                )
            backfill = asyncio.create_task(self._backfill())
            self._state = "subscribed"
            self._ready.set()
            for channel in list(self._waiters):
                if channel in self._sent:
                    self._wake(channel)
            self._changed.set()  # channels gained or lost while connecting
            tasks.add(asyncio.create_task(self._sync(), name="coordinator-relay-sync"))
            for link in self._links.values():
                tasks.add(asyncio.create_task(self._receive(link), name="coordinator-relay-reader"))
            for task in tasks:  # retrieved even if stop() interrupts the cleanup below
                task.add_done_callback(_retrieve)
            while True:
                waiting = tasks if backfill is None else {*tasks, backfill}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a failed backfill, sync or reader: reconnect
                    if task is not backfill:
                        raise ConnectionError(f"relay task {task.get_name()} ended")
                    backfill = None
        except Exception as exc:
            lost = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            for task in tasks:
                task.cancel()  # first: a reader must not see the state cleared below
            self._ready.clear()
            self._sent, self._awaiting, self._generation = set(), {}, {}
            self._link_of, self._leaving = {}, {}
            self._notify_watchers("lost", lost)
            for task in tasks:
                await cancel_and_wait(task, name=task.get_name())
            await cancel_and_wait(backfill, name="relay-backfill")
            links, self._links = self._links, {}
            for link in links.values():
                await link.close()

    async def _receive(self, link: _Link) -> None:
        """Read one connection of the listener: route events, count confirmations,
        PING it every ``relay_keepalive_s``; raise when it drops or goes quiet."""
        loop = asyncio.get_running_loop()
        keepalive = self.settings.relay_keepalive_s
        last_rx = last_ping = loop.time()
        handled = 0
        while True:
            message = await link.pubsub.get_message(timeout=min(1.0, keepalive))
            now = loop.time()
            if message is not None:
                last_rx = now
                kind = message.get("type")
                if kind == "message" or kind == "smessage":
                    self._route(message)
                    handled += 1
                    if handled % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)
                elif kind == "subscribe" or kind == "ssubscribe":
                    channel = self.keys.events_channel_of(message["channel"])
                    if channel is not None:
                        self._confirmed(channel)
                elif kind == "sunsubscribe":
                    self._unsubscribed(message["channel"])
            if now - last_rx > 2 * keepalive:
                raise ConnectionError(f"no reply from Redis for {now - last_rx:.1f}s")
            if now - last_ping >= keepalive:
                last_ping = now
                await link.pubsub.ping()

    def _unsubscribed(self, name: bytes) -> None:
        """A shard channel's SUNSUBSCRIBE reply: ours, or Redis' own when the channel's
        slot moved to another node (then the listener must reconnect, or go deaf)."""
        channel = self.keys.events_channel_of(name)
        if channel is None:
            return
        due = self._leaving.get(channel, 0)
        if due > 1:
            self._leaving[channel] = due - 1
        elif due == 1:
            del self._leaving[channel]
        else:
            raise ConnectionError(
                f"Redis unsubscribed channel {channel!r} (its slot moved); reconnecting"
            )

    async def _confirm(self, link: _Link, timeout: float, count: int) -> None:
        """Wait for ``count`` subscribe confirmations on ``link`` (one per channel)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            message = await link.pubsub.get_message(timeout=max(0.01, deadline - loop.time()))
            kind = message.get("type") if message is not None else None
            if message is not None and (kind == "subscribe" or kind == "ssubscribe"):
                count -= 1
                if count <= 0:
                    return
            if message is not None and (kind == "message" or kind == "smessage"):
                self._route(message)
            if message is not None and kind == "sunsubscribe":
                self._unsubscribed(message["channel"])  # a slot moved meanwhile: again
        raise ConnectionError(f"SUBSCRIBE not confirmed within {timeout}s")

    def _route(self, message: dict[str, Any]) -> None:
        watcher = self._watchers.get(message["channel"]) if self._watchers else None
        if watcher is None:
            self._dispatch(message["data"])
            return
        try:
            watcher.message(message["data"])
        except Exception:
            logger.exception("relay watcher of %r failed on a message", message["channel"])

    def _notify_watchers(self, what: str, reason: str = "") -> None:
        for channel, watcher in self._watchers.items():
            try:
                if what == "subscribed":
                    watcher.subscribed()
                else:
                    watcher.lost(reason)
            except Exception:
                logger.exception("relay watcher of %r failed on %s", channel, what)

    async def _backfill(self) -> None:
        """After (re)subscribing: read each channel's stream after its subscribers' ids."""
        ttl = self.settings.relay_stream_ttl_s
        for channel, subs in list(self._subs.items()):
            waiting = [s for s in subs if s.backfilling and s.closed is None]
            if not waiting:
                continue
            known = [s.last_id for s in waiting if s.last_id is not None]
            after = min(known) if known else EventId(0, 0)
            entries: list[tuple[EventId, bytes]] = []
            result = await self._read(channel, after, None)
            entries.extend(result.entries)
            while len(result.entries) >= self._page:
                result = await self._read(channel, result.entries[-1][0], None)
                entries.extend(result.entries)
            for sub in waiting:
                if not sub.backfilling or sub.closed is not None:
                    continue
                floor = sub.last_id or EventId(0, 0)
                reason = result.lost_after(floor, ttl) if sub.last_id is not None else None
                reason = None if reason == "unknown-id" else reason
                sub.add_replayed(
                    [e for e in entries if e[0] > floor],
                    reset_frame(sub.last_id, reason) if reason else None,
                )
                self.stats.backfilled_events += sub.go_live()

    def _dispatch(self, message: bytes) -> None:
        self.stats.events_received += 1
        channel_end = message.find(b"\n", 2)
        if channel_end < 0:
            return
        channel = message[2:channel_end].decode("utf-8", "replace")
        subs = self._subs.get(channel)
        if not subs:
            return
        try:
            envelope = decode_envelope(message)
        except InvalidEventError:
            logger.warning("relay dropped a malformed envelope: %r", message[:80])
            return
        tip = self._tips.get(channel)
        if tip is not None and envelope.id <= tip:
            return  # the namespace channel's copy during a rolling update: already routed
        self._tips[channel] = envelope.id
        frame = sse_frame(envelope.raw_id, envelope.event, envelope.data)
        self.stats.delivery_lags.append(time.time() - envelope.id.ms / 1000)
        for sub in list(subs):
            sub.push(envelope.id, frame)
